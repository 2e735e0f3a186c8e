"""CompiledDenoisers: one device worker's ahead-of-time compiled denoisers, built in the background.

Design notes
- What is compiled: the family's forward (`adapter.forward`: the UNet or
  transformer call with the family's argument names), exported with
  `torch.export` and compiled by AOTInductor (`aoti_compile_and_package`)
  into one `.pt2` file per model, size, guidance mode and cohort-size
  bucket. Freezing the weights into the graph (Inductor's prepacking) did
  not pay on the shapes UNet here (1.39x and 1.74x of eager against 1.64x
  and 2.03x without in two interleaved runs, equal in a third), so it is
  off: the weights stay plain constants. The eager denoiser is never changed, so the eager
  path keeps the pipeline's pixels exactly.
- Cohort sizes change every step; a compiled graph wants fixed shapes. The
  rows of a forward chunk are padded up to a bucket: the powers of two below
  the step's row cap, and the cap itself. A storm of sizes therefore builds
  at most log2(cap) + 2 graphs per model, size and guidance mode (`status`
  counts them). Padded rows repeat the last real row and are cut off after
  the forward; a denoiser never mixes rows, so the real rows differ from an
  unpadded forward by batch rounding only.
- Never slower to start: the build runs in a child process at the lowest
  CPU priority, never in this process. Inductor's tracing and lowering are
  seconds of Python; on a thread here they would hold the GIL that the
  device thread retakes after every eager op (each torch op releases it),
  stalling every step by up to the switch interval per op. This process
  only loads the finished package (a shared library and its weights), on
  the compiler thread.
- Lanes, on a CPU: a forward's rows (padded to their bucket) are split over
  lanes that run at once, as many as there are rows up to one per intra-op
  thread, the threads shared out between them (`forward_lanes`: fewer waits
  between threads than one forward on all of them). A package is built for
  a lane's rows and threads: on two threads a bucket of 16 rows is the
  8-row, one-thread package twice, a bucket of 1 row the 1-row, two-thread
  package once. `compile.lanes` 1 runs each forward whole on all threads.
- Handover between steps: the device thread asks once per step
  (`for_step`) whether every chunk's bucket is ready; only then does the
  step run compiled, else it runs eager and the missing buckets are queued.
  A step is wholly eager or wholly compiled, the latents change only after
  all its chunks (`predict_noise`), so no step is lost or repeated.
- Cache: a package's file name is a digest of what decides it (the model
  folder and its denoiser weights' size and time, the family, the input
  shapes and dtypes, the bucket, the device, torch's version, the options),
  so a restart loads it instead of compiling again, and changed weights or
  a new torch never load a stale one.
- Calling a package (`package_runners`): on the CPU through its library's C
  entry point, which lets the GIL go for the forward (AOTInductor's loader
  holds it through a whole call); on CUDA replayed as a CUDA graph captured
  on its first use (static input buffers; the copy in and out is the only
  host work).
- Cost: each package holds its own copy of the denoiser weights, so memory
  grows by a copy per bucket in use; fine for the small models this runs on
  a CPU, to be weighed on a GPU with a large model (unfrozen packages could
  take the eager module's tensors instead: AOTInductor's user-managed
  constants, not done).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch

from .forward_lanes import ForwardLanes, LanesUnavailable
from .package_runners import load_runner

if TYPE_CHECKING:
    from .image_spec import ImageSpec

log = logging.getLogger("embedded_worker.compile")
FORMAT = 1  # bump when what a package holds changes: old files are then never loaded
INDUCTOR_OPTIONS = {"freezing": False}  # measured no faster (design notes)
# compiled and eager pixels of the same request differ by at most this many uint8 levels (fused kernels round
# differently in the last float bits; measured over 12 seeds each on tiny SD and tiny Flux, README)
PIXEL_TOLERANCE = 2


@dataclass(frozen=True)
class GraphKey:
    """What decides one compiled graph: the model, the forward's input shapes (rows: a lane's) and dtypes, and
    the intra-op threads its kernels are written for."""

    model_id: str
    height: int
    width: int
    inputs: tuple  # (name, shape, dtype) of sample, timestep and each conditioning row, rows at a lane's
    threads: int

    @property
    def bucket(self) -> int:
        return self.inputs[0][1][0]


@dataclass
class BuildJob:
    """One package to build: what the child process needs to load the model and trace its forward."""

    key: GraphKey
    folder: Path
    family: str
    device: str
    dtype: str
    path: Path
    guidance_scale: float


@dataclass
class CompileCounters:
    steps_compiled: int = 0
    steps_eager: int = 0
    forwards_compiled: int = 0
    graphs_built: int = 0  # compiled in a child process (the cache missed)
    graphs_loaded: int = 0  # packages loaded, built now or found in the cache
    compile_seconds: float = 0.0  # wall time of the builds (child processes)
    load_seconds: float = 0.0
    failures: dict = field(default_factory=dict)  # model id -> the last build error


def buckets(max_rows: int) -> list[int]:
    """The row counts a forward chunk is padded to: powers of two below `max_rows`, and `max_rows`."""
    sizes, size = [], 1
    while size < max_rows:
        sizes.append(size)
        size *= 2
    return [*sizes, max_rows]


def bucket_for(rows: int, max_rows: int) -> int:
    return next(size for size in buckets(max_rows) if size >= rows)


class CompiledDenoisers:
    """Compiled forwards of the models one device worker runs, looked up by the device thread once per step."""

    def __init__(self, worker_name: str, device: torch.device, dtype: torch.dtype, cache_dir: Path,
                 lanes: int | None = None):
        self.worker_name = worker_name
        self.device = device
        self.dtype = dtype
        self.cache_dir = Path(cache_dir)
        self.threads = torch.get_num_threads() if device.type == "cpu" else 1  # what lanes share out
        self.lanes = _make_lanes(worker_name, lanes or self.threads) if device.type == "cpu" else None
        self.counters = CompileCounters()
        # guards _runners, _queued, _wanted, _failed, _closing and the counters the compiler thread writes
        self._cond = threading.Condition()
        self._runners: dict[GraphKey, Callable] = {}  # ready: the device thread may call these
        self._queued: deque[BuildJob] = deque()
        self._wanted: set[GraphKey] = set()  # queued or building
        self._failed: set[tuple] = set()  # (model id, height, width): a build failed, it stays eager
        self._closing = False
        self._child: subprocess.Popen | None = None
        self.building: GraphKey | None = None
        self.last_path = "eager"  # the path the device's last step took
        # called on the compiler thread with each key before its runner is published: tests hold a handover here
        self.before_ready: list[Callable[[GraphKey], None]] = []
        self.build: Callable[[BuildJob], Callable] = self._build_and_load  # how a job becomes a runner
        self._thread = threading.Thread(target=self._run, name=f"ew-compile-{worker_name}", daemon=True)
        self._thread.start()

    # ---- the device thread -------------------------------------------------------------------

    def for_step(self, model_id: str, folder: Path, family: str, spec: ImageSpec,
                 chunks: list[tuple[torch.Tensor, torch.Tensor, dict]], max_rows: int) -> Callable | None:
        """The compiled forward for this step's chunks when every chunk's bucket is ready (a callable of
        sample, timestep, rows), else None, with the missing buckets queued for building."""
        plans = [self._plan(bucket_for(chunk[0].shape[0], max_rows)) for chunk in chunks]
        keys = [self._key(model_id, spec, chunk, rows, threads) for chunk, (_, rows, threads) in zip(chunks, plans)]
        with self._cond:
            runners = [self._runners.get(key) for key in keys]
            self.last_path = "compiled" if all(runners) else "eager"
            if all(runners):
                self.counters.steps_compiled += 1
                self.counters.forwards_compiled += len(chunks)
                return _StepRunner(dict(zip(keys, runners)), [(key, lanes) for key, (lanes, _, _) in zip(keys, plans)],
                                   self.lanes)
            self.counters.steps_eager += 1
            if (model_id, spec.height, spec.width) in self._failed or self._closing:
                return None
            for key, runner in zip(keys, runners):
                if runner is None and key not in self._wanted:
                    self._wanted.add(key)
                    self._queued.append(self._job(key, folder, family, spec))
                    self._cond.notify_all()
        return None

    def _plan(self, bucket: int) -> tuple[int, int, int]:
        """How a bucket runs: (lanes, rows of each, threads of each); each lane at least one row."""
        lanes = 1 if self.lanes is None else min(self.lanes.count, bucket)
        return lanes, -(-bucket // lanes), max(1, self.threads // lanes)

    def _key(self, model_id: str, spec: ImageSpec, chunk: tuple, bucket: int, threads: int) -> GraphKey:
        sample, timestep, rows = chunk
        described = [("sample", sample), ("timestep", timestep), *sorted(rows.items())]
        inputs = tuple((name, (bucket, *tensor.shape[1:]), str(tensor.dtype).removeprefix("torch."))
                       for name, tensor in described)
        return GraphKey(model_id, spec.height, spec.width, inputs, threads)

    def _job(self, key: GraphKey, folder: Path, family: str, spec: ImageSpec) -> BuildJob:
        weights = sorted(p for p in Path(folder).glob("*/*.safetensors") if p.parent.name in ("unet", "transformer"))
        identity = {"format": FORMAT, "folder": str(Path(folder).resolve()), "family": family,
                    "weights": [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in weights],
                    "inputs": key.inputs, "size": (key.height, key.width), "device": self.device.type,
                    "dtype": str(self.dtype), "torch": torch.__version__, "options": INDUCTOR_OPTIONS,
                    "threads": key.threads}
        digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:20]
        path = self.cache_dir / f"{family}-{key.height}x{key.width}-rows{key.bucket}-threads{key.threads}-{digest}.pt2"
        return BuildJob(key, Path(folder), family, str(self.device), str(self.dtype).removeprefix("torch."), path,
                        spec.guidance_scale)

    # ---- other threads -----------------------------------------------------------------------

    def status(self) -> dict:
        """For device.get_status: which path the worker's steps take, the graphs it holds, the time spent."""
        with self._cond:
            counters = self.counters
            return {"path": self.last_path, "lanes": 1 if self.lanes is None else self.lanes.count,
                    "compiling": bool(self._wanted),
                    "graphs": len(self._runners), "building": None if self.building is None else
                    f"{self.building.model_id} {self.building.height}x{self.building.width} "
                    f"rows {self.building.bucket}",
                    "queued": len(self._queued), "steps_compiled": counters.steps_compiled,
                    "steps_eager": counters.steps_eager, "graphs_built": counters.graphs_built,
                    "graphs_loaded": counters.graphs_loaded, "compile_seconds": round(counters.compile_seconds, 2),
                    "load_seconds": round(counters.load_seconds, 2), "failures": dict(counters.failures),
                    "cache_dir": str(self.cache_dir)}

    def graphs(self, model_id: str | None = None) -> list[GraphKey]:
        with self._cond:
            return [key for key in self._runners if model_id is None or key.model_id == model_id]

    def forget(self, model_id: str) -> None:
        """A model left the worker: its runners (and their weights) go too; its packages stay cached."""
        with self._cond:
            self._runners = {k: v for k, v in self._runners.items() if k.model_id != model_id}

    def close(self) -> None:
        with self._cond:
            self._closing = True
            self._queued.clear()
            child = self._child
            self._cond.notify_all()
        if child is not None and child.poll() is None:
            child.kill()  # the child we started, by its handle
        self._thread.join(30)
        if self.lanes is not None:
            self.lanes.close()

    # ---- the compiler thread -----------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queued and not self._closing:
                    self._cond.wait()
                if self._closing:
                    return
                job = self._queued.popleft()
                self.building = job.key
            try:
                runner = self.build(job)
                for hook in self.before_ready:
                    hook(job.key)
            except Exception as error:
                log.warning("%s: compiling %s failed, it stays eager: %s", self.worker_name, job.key.model_id, error)
                with self._cond:
                    self.counters.failures[job.key.model_id] = f"{type(error).__name__}: {error}"[-2000:]
                    self._failed.add((job.key.model_id, job.key.height, job.key.width))
                    self._wanted.discard(job.key)
                    self.building = None
                continue
            with self._cond:
                self._runners[job.key] = runner
                self._wanted.discard(job.key)
                self.building = None

    def _build_and_load(self, job: BuildJob) -> Callable:
        if not job.path.is_file():
            started = time.perf_counter()
            self._build_in_child(job)
            with self._cond:
                self.counters.graphs_built += 1
                self.counters.compile_seconds += time.perf_counter() - started
            log.info("%s compiled %s (%s) in %.1f s", self.worker_name, job.key.model_id, job.path.name,
                     time.perf_counter() - started)
        started = time.perf_counter()
        runner = load_runner(job.path, self.device, 1 if self.lanes is None else self.lanes.count)
        with self._cond:
            self.counters.graphs_loaded += 1
            self.counters.load_seconds += time.perf_counter() - started
        return runner

    def _build_in_child(self, job: BuildJob) -> None:
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        spec = {"key": {"model_id": job.key.model_id, "height": job.key.height, "width": job.key.width,
                        "inputs": job.key.inputs},
                "folder": str(job.folder), "family": job.family, "device": job.device, "dtype": job.dtype,
                "path": str(job.path), "guidance_scale": job.guidance_scale, "threads": job.key.threads}
        # the child finds this process's packages (a .NET host's sys.executable is the base interpreter)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p),
               "TORCHINDUCTOR_CACHE_DIR": str(self.cache_dir / "inductor"), "HF_HUB_OFFLINE": "1"}
        with self._cond:
            if self._closing:
                raise RuntimeError("the worker is closing")
            self._child = subprocess.Popen([sys.executable, "-c", _CHILD, json.dumps(spec)], env=env,
                                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            child = self._child
        _, errors = child.communicate()
        with self._cond:
            self._child = None
        if child.returncode != 0:
            raise RuntimeError(f"the compiler process exited with {child.returncode}: {errors.strip()[-1500:]}")


class _StepRunner:
    """One step's compiled forward: each chunk padded to its package's rows times its lanes, run (over the
    lanes, each its package's rows), and cut back to its rows."""

    def __init__(self, runners: dict, plan: list[tuple[GraphKey, int]], lanes: ForwardLanes | None = None):
        self._runners = runners
        self._plan = iter(plan)  # per chunk: its package's key and the lanes it is split over
        self._lanes = lanes

    def __call__(self, sample: torch.Tensor, timestep: torch.Tensor, rows: dict) -> torch.Tensor:
        key, parts = next(self._plan)
        count, padded_rows = sample.shape[0], key.bucket * parts
        padded = [_pad(t, padded_rows) for t in (sample, timestep)]
        conditions = {k: _pad(v, padded_rows) for k, v in rows.items()}
        runner = self._runners[key]
        if self._lanes is None:
            return runner(*padded, conditions)[:count]
        return self._lanes.run(runner, parts, key.threads, *padded, conditions)[:count]


def _pad(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    """`tensor` with its last row repeated up to `rows` rows, contiguous (a compiled graph assumes it)."""
    missing = rows - tensor.shape[0]
    if missing:
        tensor = torch.cat([tensor, tensor[-1:].expand(missing, *tensor.shape[1:])])
    return tensor.contiguous()


def _make_lanes(worker_name: str, count: int) -> ForwardLanes | None:
    """A CPU worker's `count` lanes; None for one (each forward whole, on the device thread)."""
    if count < 2:
        return None
    try:
        return ForwardLanes(count, worker_name)
    except LanesUnavailable as why:
        log.warning("%s: compiled forwards run whole on the device thread: %s", worker_name, why)
        return None


# The child's first lines: the lowest CPU priority there is (Linux's idle class, else nice 19), then the build. The
# child sets it itself, not through a preexec_fn, so that Popen may vfork this large process instead of copying
# it. Its compiler's processes inherit it. A cold cache's first image against compiling off (5 fresh processes
# each, interleaved): nice 19 through a preexec_fn +19 %, the idle class through one +11 %, set here -3 % to +9 %.
_CHILD = """
import os, runpy
try:
    os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
except (AttributeError, OSError):
    if hasattr(os, "nice"):
        os.nice(19)
runpy.run_module("embedded_worker.diffusion.compile_package", run_name="__main__")
"""
