"""How a built denoiser package (`compiled_denoiser`) is called: on the CPU through the C entry point of its
shared library, letting the GIL go for the whole forward; through AOTInductor's loader where the package is
more than that library; on CUDA, replayed as a CUDA graph.

Why not the loader everywhere: `AOTIModelPackageLoader.run` holds the GIL through a whole call (measured
here: a thread sleeping 1 ms at a time woke once per compiled forward of 23 to 39 ms, against 212 times in
as many forwards called through the library). While it runs no other thread of the process runs Python:
not the .NET host's status calls and polls, not a second device worker. A ctypes call of the library lets
the GIL go. A CPU package's library holds its weights itself (AOTInductor's default); a package with
anything more beside it (weights on disk, as for models too large to embed) is called through the loader.

The inputs go flat in the order the package was traced with (`compile_package`): sample, timestep, then
the conditioning rows by name.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import zipfile
from pathlib import Path

import torch

log = logging.getLogger("embedded_worker.compile")
_PARTS = (".cpp", ".json", ".so")  # what a package whose library holds everything has under data/


def load_runner(path: Path, device: torch.device, concurrent: int = 1):
    """A callable (sample, timestep, rows) -> noise prediction for the package at `path`, which `concurrent`
    threads may call at once (`forward_lanes`)."""
    if device.type == "cuda":
        return CudaGraphRunner(LoaderRunner(path, device), device)
    library = _library_alone(path)
    if library is None:
        log.info("%s holds more than its library: called through AOTInductor's loader (holding the GIL, so "
                 "lanes run one after another)", path.name)
        return LoaderRunner(path, device, concurrent)
    return LibraryRunner(library, concurrent)


class LibraryRunner:
    """The package's library called through its C entry point (`AOTInductorModelContainerRun`), by ctypes,
    which releases the GIL for the call. The run takes over the input handles and hands back new ones for
    its outputs, which become tensors without a copy. A container of `concurrent` model instances (sharing one
    copy of the weights) takes as many calls at once."""

    def __init__(self, library: Path, concurrent: int = 1):
        self._container = ctypes.c_void_p()  # first: `__del__` reads it even when loading failed
        self._library = ctypes.CDLL(str(library))
        _check(self._library.AOTInductorModelContainerCreateWithDevice(
            ctypes.byref(self._container), ctypes.c_size_t(concurrent), b"cpu", None), "load")
        outputs = ctypes.c_size_t()
        _check(self._library.AOTInductorModelContainerGetNumOutputs(self._container, ctypes.byref(outputs)),
               "count the outputs of")
        self._outputs = outputs.value
        self._run = self._library.AOTInductorModelContainerRun
        self._run.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p), ctypes.c_size_t,
                              ctypes.POINTER(ctypes.c_void_p), ctypes.c_size_t, ctypes.c_void_p, ctypes.c_void_p]

    def __call__(self, sample: torch.Tensor, timestep: torch.Tensor, rows: dict) -> torch.Tensor:
        tensors = [sample, timestep, *(rows[name] for name in sorted(rows))]
        handles = [_pointer(h) for h in torch._C._aoti.unsafe_alloc_void_ptrs_from_tensors(tensors)]
        inputs = (ctypes.c_void_p * len(handles))(*handles)
        outputs = (ctypes.c_void_p * self._outputs)()
        _check(self._run(self._container, inputs, len(handles), outputs, self._outputs, None, None), "run")
        return torch._C._aoti.alloc_tensors_by_stealing_from_void_ptrs([_capsule(o) for o in outputs])[0]

    def __del__(self):
        if self._container:
            self._library.AOTInductorModelContainerDelete(self._container)


class LoaderRunner:
    """A package called through AOTInductor's C++ loader (loading it through `torch._inductor` imported
    seconds of Python first, GIL held, and its wrapper parsed the call's tree spec on every call)."""

    def __init__(self, path: Path, device: torch.device, concurrent: int = 1):
        index = device.index or 0 if device.type == "cuda" else -1
        self._loader = torch._C._aoti.AOTIModelPackageLoader(str(path), "model", False, concurrent, index)

    def __call__(self, sample: torch.Tensor, timestep: torch.Tensor, rows: dict) -> torch.Tensor:
        return self._loader.run([sample, timestep, *(rows[name] for name in sorted(rows))])[0]


class CudaGraphRunner:
    """A package replayed as a CUDA graph: captured on first use with static inputs; later calls copy in,
    replay, and copy the output out (the next replay overwrites it)."""

    def __init__(self, runner, device: torch.device):
        self._runner = runner
        self._device = device
        self._graph = None
        self._inputs = None
        self._output = None

    def __call__(self, sample, timestep, rows):
        inputs = [sample, timestep, *rows.values()]
        if self._graph is None:
            self._inputs = [t.clone() for t in inputs]
            side = torch.cuda.Stream(self._device)
            side.wait_stream(torch.cuda.current_stream(self._device))
            with torch.cuda.stream(side):
                self._call_static(rows)  # warm-up outside the capture
            torch.cuda.current_stream(self._device).wait_stream(side)
            self._graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self._graph):
                self._output = self._call_static(rows)
        for static, value in zip(self._inputs, inputs):
            static.copy_(value)
        self._graph.replay()
        return self._output.clone()

    def _call_static(self, rows: dict):
        sample, timestep, *conditions = self._inputs
        return self._runner(sample, timestep, dict(zip(rows, conditions)))


def _library_alone(path: Path) -> Path | None:
    """The package's shared library, taken out beside the package (once): None when the package holds anything
    the library would not (then only the loader knows how to use it)."""
    with zipfile.ZipFile(path) as archive:
        data = [n for n in archive.namelist() if "/data/" in f"/{n}" and not n.endswith("/")]
        libraries = [n for n in data if n.endswith(".so")]
        if len(libraries) != 1 or not all(n.endswith(_PARTS) for n in data):
            return None
        library = path.with_suffix(".so")
        if not library.is_file():
            partial = path.with_name(f"{path.stem}.{os.getpid()}.partial.so")
            partial.write_bytes(archive.read(libraries[0]))
            os.replace(partial, library)
    return library


def _check(code: int, what: str) -> None:
    if code != 0:
        raise RuntimeError(f"AOTInductor could not {what} the compiled denoiser (error {code})")


@functools.cache
def _capsule_api():
    """CPython's capsule calls, looked up on first use (never at import: a host embedding Python must not fail
    to start over what only the compiled path uses)."""
    get_pointer, new = ctypes.pythonapi.PyCapsule_GetPointer, ctypes.pythonapi.PyCapsule_New
    get_pointer.restype, get_pointer.argtypes = ctypes.c_void_p, [ctypes.py_object, ctypes.c_char_p]
    new.restype, new.argtypes = ctypes.py_object, [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]
    return get_pointer, new


def _pointer(capsule) -> int:
    return _capsule_api()[0](capsule, None)


def _capsule(pointer: int):
    return _capsule_api()[1](pointer, None, None)
