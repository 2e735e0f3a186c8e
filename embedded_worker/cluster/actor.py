"""DenoiseActor: a remote device worker's far side, one Ray actor holding its own pipeline.

Design notes
- Inside, it is this package's own device side: a DevicePool with one
  DeviceWorker on the actor's device runs our denoising loop, so images the
  head hands over in one burst share forwards (iteration-level coalescing)
  exactly as they would locally.
- Threaded (`max_concurrency` > 1): every `run` call holds one actor thread
  until its image is done, and `progress`, `cancel` and `load` are served
  by the others while the device thread steps.
- `run` returns the image's uint8 HWC array; Ray puts it in the object
  store (one copy) and the head reads it from there.
- No state of its own survives it: the head keeps every request and
  re-sends it elsewhere when this actor dies. Each image's denoise state
  goes back to the head with the progress it polls (taken every few steps,
  as checkpoints are locally: `StatesForHead`), and a paused image's
  state is `run`'s answer instead of pixels; the head resumes it from
  there, here or anywhere else (`run`'s `resume`).
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ..diffusion.smoothing import smoothed

CANCEL_MEMORY_S = 300.0  # a cancel that overtook its `run` waits this long for it; then the image had finished


class DenoiseActor:
    def __init__(self, config: dict, name: str):
        from ..config import WorkerConfig
        from ..diffusion.device_pool import DevicePool
        from ..diffusion.models import ModelCatalog
        from ..diffusion.offline import quiet_libraries

        quiet_libraries()
        self.name = name
        worker_config = WorkerConfig.model_validate(config)
        # no work state here (the head's loop owns it): what happens to an image is told on one thread of its own
        models = ModelCatalog(worker_config.models, worker_config.resolved_model_cache_dir)
        self.states = StatesForHead()
        self.pool = DevicePool(worker_config.device_settings(), models,
                               events=ThreadPoolExecutor(1, thread_name_prefix="ew-actor-events"),
                               mark_on_device=lambda tasks, left: None,
                               checkpoints=self.states if worker_config.checkpoints.enabled else None)
        self.pool.start()
        self._lock = threading.Lock()  # guards _tasks and _cancelled
        self._tasks: dict[str, object] = {}  # the head's key -> the DenoiseTask running it here
        self._cancelled: dict[str, float] = {}  # key -> when: cancelled before its `run` began (calls may overtake)

    def ready(self) -> dict:
        import ray

        context = ray.get_runtime_context()
        return {"name": self.name, "node_id": context.get_node_id(), "pid": os.getpid()}

    def load(self, model_id: str) -> list[str]:
        worker = self.pool.workers[0]
        worker.call(lambda w: w.load(model_id)).result()
        return worker.pipelines.loaded()

    def unload(self, model_id: str) -> bool:
        return self.pool.workers[0].call(lambda w: w.unload(model_id)).result()

    def run(self, key: str, spec, priority: int, resume: tuple[int, bytes] | None = None) \
            -> np.ndarray | tuple[int, bytes]:
        """Denoise and decode one image (from `resume`, its (step, state bytes), when given); its pixels, uint8
        HWC, or, paused, its (step, state bytes) (empty when it never started). Cancelled when the head
        cancelled it."""
        from ..diffusion.denoise_state import DenoiseState
        from ..diffusion.resume_points import HeldState
        from ..diffusion.task import DenoiseTask
        from ..errors import Cancelled

        watch = ParkWatch()
        task = DenoiseTask(spec, priority, listener=watch, record_id=key)
        task.checkpoint_key = "remote"  # its state goes to the head (`StatesForHead`)
        task.resume_from = HeldState(*resume) if resume is not None else None
        with self._lock:
            if self._cancelled.pop(key, None) is not None:
                raise Cancelled("cancelled")
            self._tasks[key] = task
        try:
            self.pool.submit(task)
            while not watch.parked.wait(0.02):
                if task.future.done():
                    return task.future.result()
            cohort, held = task.parked, task.resume_from  # offloaded to host memory on an accelerator: held
            state = (cohort.step_index, DenoiseState.capture(cohort)[0].to_bytes()) if cohort is not None else \
                (held.step, held.read()) if held is not None else (0, b"")
            self.pool.cancel(task)  # ended here: the head holds what it needs to go on
            return state
        finally:
            with self._lock:
                self._tasks.pop(key, None)
            self.states.forget(key)

    def pause(self, key: str) -> None:
        """Park the image at its next step boundary: its `run` then answers with its state."""
        with self._lock:
            task = self._tasks.get(key)
        if task is not None:
            self.pool.pause(task)

    def cancel(self, key: str) -> None:
        with self._lock:
            task = self._tasks.get(key)
            if task is None:  # its `run` has not begun (a threaded actor may take calls out of order), or it ended
                now = time.monotonic()
                for old in [k for k, when in self._cancelled.items() if now - when > CANCEL_MEMORY_S]:
                    del self._cancelled[old]  # their images had ended: no `run` will ask
                self._cancelled[key] = now
        if task is not None:
            self.pool.cancel(task)

    def progress(self) -> dict:
        """What the head shows: each image's step, its steps in all, ETA and the step it continued from; the
        worker's speed and memory; the states taken since the last call."""
        with self._lock:
            tasks = dict(self._tasks)
        worker = self.pool.workers[0]
        return {"images": {key: (t.step, t.total_steps, t.eta_seconds, t.resumed_from_step)
                           for key, t in tasks.items()},
                "states": self.states.take(),
                "seconds_per_step": worker.seconds_per_step,
                "loaded_models": worker.pipelines.loaded(),
                "memory": next(iter(self.pool.monitors.values())).snapshot()}

    def close(self) -> bool:
        return self.pool.close(10.0, 30.0)


class ParkWatch:
    """An actor-side image's listener: `run` waits on `parked` besides the image's future."""

    def __init__(self):
        self.parked = threading.Event()

    def task_started(self, task) -> None:
        pass

    def task_stepped(self, task) -> None:
        pass

    def task_parked(self, task) -> None:
        self.parked.set()


class StatesForHead:
    """The actor's checkpoint sink (`checkpoint_cadence.CheckpointSink`): the newest state of each image,
    kept until the head's next progress poll takes it as bytes (turned to bytes there, off the device
    thread, which is what `seconds_per_image` measures)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._newest: dict[str, object] = {}  # the head's key -> its image's newest DenoiseState
        self.seconds_per_image: float | None = None

    def save(self, record_id: str, image: str, state) -> None:
        with self._lock:
            self._newest[record_id] = state

    def forget(self, key: str) -> None:
        with self._lock:
            self._newest.pop(key, None)

    def take(self) -> dict[str, tuple[int, bytes]]:
        with self._lock:
            newest, self._newest = self._newest, {}
        started = time.perf_counter()
        taken = {key: (state.step_index, state.to_bytes()) for key, state in newest.items()}
        if taken:
            self.seconds_per_image = smoothed(self.seconds_per_image, (time.perf_counter() - started) / len(taken))
        return taken
