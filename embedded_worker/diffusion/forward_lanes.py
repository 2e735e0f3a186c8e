"""ForwardLanes: one compiled forward's rows split over lanes that run at once, the threads shared out.

Why: a forward on torch's intra-op threads is hundreds of parallel regions (each compiled kernel, each oneDNN
convolution, each attention), and the threads of each region wait for one another at its end. At the sizes
this worker runs on a CPU (a few rows of a denoiser) those waits are much of the work, and a partner that the
machine deschedules stalls every region (README, "Threads"). Two lanes of half the rows, one thread each,
meet once per forward: the shapes UNet's 16 rows ran 1.07x to 1.12x faster as two lanes of 8 than as one
forward on two threads, and 2 rows 1.15x faster as two lanes of 1 (paired, one process), bit for bit the
same rows. The pictures are those of the compiled path (`compiled_denoiser.PIXEL_TOLERANCE`).

How: a lane is a thread that sets its own OpenMP (libgomp's per-thread `omp_set_num_threads`) and MKL
(`MKL_Set_Num_Threads_Local`) thread counts to its share, which leaves the process's own (torch's setting,
what the eager path and the device thread use) as they were; the lanes call packages built for that share
(Inductor writes the count into each kernel) through their library, which lets the GIL go
(`package_runners`), so the lanes run at once."""

from __future__ import annotations

import ctypes
import functools
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

log = logging.getLogger("embedded_worker.compile")


class LanesUnavailable(RuntimeError):
    """This torch build gives no way to set one thread's thread count alone (no OpenMP runtime in reach)."""


class ForwardLanes:
    """`count` lane threads; `run` spreads one forward's rows over some of them and waits for all."""

    def __init__(self, count: int, name: str):
        self._set_openmp, self._set_mkl = _thread_count_setters()
        self.count = count
        self._mine = threading.local()  # on each lane thread: the thread count it runs at
        self._pool = ThreadPoolExecutor(count, thread_name_prefix=f"ew-lane-{name}")
        # every lane thread made and set now: a lane's first forward must not be the one to do it
        everyone = threading.Barrier(count)
        settled = [self._pool.submit(self._settle, everyone) for _ in range(count)]
        threads = {future.result() for future in settled}
        if threads != {1}:
            self._pool.shutdown(wait=False)
            raise LanesUnavailable(f"a lane thread still runs {threads} threads")

    def run(self, runner, parts: int, threads: int, sample: torch.Tensor, timestep: torch.Tensor,
            rows: dict) -> torch.Tensor:
        """`runner` over `parts` equal slices of the rows, one slice a lane of `threads` threads, at once; the
        outputs in row order."""
        size = sample.shape[0] // parts
        cuts = [slice(part * size, (part + 1) * size) for part in range(parts)]
        futures = [self._pool.submit(self._call, runner, threads, sample[cut], timestep[cut],
                                     {k: v[cut] for k, v in rows.items()}) for cut in cuts]
        outputs = [future.result() for future in futures]
        return torch.cat(outputs) if parts > 1 else outputs[0]

    def close(self) -> None:
        self._pool.shutdown(wait=False)

    def _call(self, runner, threads: int, *inputs) -> torch.Tensor:
        if self._mine.threads != threads:
            self._set_threads(threads)
        return runner(*inputs)

    def _settle(self, everyone: threading.Barrier) -> int:
        """On a new lane thread: torch's per-thread setup first (it would otherwise set the count back on this
        thread's first parallel operation), then one thread. Waits for the other lanes, so that each setup runs
        on a thread of its own."""
        torch.get_num_threads()
        self._set_threads(1)
        everyone.wait(60)
        return torch.get_num_threads()

    def _set_threads(self, threads: int) -> None:
        """This thread's OpenMP and MKL thread counts; no other thread's."""
        self._set_openmp(threads)
        if self._set_mkl is not None:
            self._set_mkl(threads)
        self._mine.threads = threads


@functools.cache
def _thread_count_setters():
    """libgomp's `omp_set_num_threads` (per calling thread) and MKL's `MKL_Set_Num_Threads_Local` (None when
    torch runs without MKL), as loaded by torch."""
    if not torch.backends.openmp.is_available():
        raise LanesUnavailable("torch runs without OpenMP")
    try:
        set_openmp = ctypes.CDLL(None).omp_set_num_threads
    except AttributeError:
        raise LanesUnavailable("no omp_set_num_threads in the process") from None
    set_openmp.argtypes, set_openmp.restype = [ctypes.c_int], None
    if not torch.backends.mkl.is_available():
        return set_openmp, None
    try:
        set_mkl = ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / "libtorch_cpu.so")).MKL_Set_Num_Threads_Local
    except (OSError, AttributeError):
        log.warning("MKL's per-thread setting is out of reach: a lane's matrix products may take two threads")
        return set_openmp, None
    set_mkl.argtypes, set_mkl.restype = [ctypes.c_int], ctypes.c_int
    return set_openmp, set_mkl
