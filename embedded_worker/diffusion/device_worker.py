"""DeviceWorker: one named thread that drives one device, one denoising step at a time.

Design notes
- The step loop: wait for work, admit (`Admission` decides which queued
  images join), let images join and leave at the boundary (`ActiveSet`),
  one denoiser forward (UNet or transformer) over every active image
  (`forward`), decode the cohorts that finished. Eight single-image sessions cost about one batch of eight,
  and a request that arrives mid-run joins at the next step.
- The device thread launches work and hands results off, nothing more: it
  never touches a record. It waits once when images start (the lifecycle
  loop stores them as on the device), posts what happened to each image to
  the loop, and hands results out through the images' futures.
- A pipeline belongs to its worker and is touched from this thread only
  (pipelines are not thread-safe). Model loads and unloads asked for by
  other threads run here between steps (`call`).
- Out of memory shrinks the capacity (`_shrink`): the step is retried in
  smaller chunks, no image is lost or run twice.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import Counter, deque
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch

from ..errors import Unavailable
from .active_set import ActiveSet
from .compiled_denoiser import CompiledDenoisers
from .oom_backoff import decode, forward, release_memory
from .pipelines import PipelineCache
from .smoothing import smoothed
from .task import DONE
from .worker_thread import WorkerThread

if TYPE_CHECKING:
    from .active_set import OnDeviceMark
    from .admission import Admission
    from .checkpoint_cadence import CheckpointCadence
    from .memory import MemoryMonitor
    from .models import ModelCatalog
    from .task import DenoiseTask
    from .work_queue import WorkQueue

log = logging.getLogger("embedded_worker.device")


@dataclass
class WorkerCounters:
    forwards: int = 0
    preemptions: int = 0
    preempted_images: int = 0  # images preempted at least once: preemptions / preempted_images is the churn
    steps: int = 0
    images_done: int = 0
    cohorts_started: int = 0
    out_of_memory: int = 0
    resumed_images: int = 0  # images that continued from a checkpoint
    steps_restored: int = 0  # the steps those did not compute again
    # what they may compute again: the steps a process that died (or an actor lost) did after their states were
    # taken, each state's interval (plus any taken while its next write was on its way); 0 after a pause or suspend
    steps_recomputed_at_most: int = 0
    checkpoints_refused: int = 0  # checkpoints that could not be used: their images started from step 0


class DeviceWorker(WorkerThread):
    def __init__(
        self,
        name: str,
        device: torch.device,
        dtype: torch.dtype,
        queue: WorkQueue,
        catalog: ModelCatalog,
        monitor: MemoryMonitor,
        admission: Admission,
        events: Executor,
        mark_on_device: OnDeviceMark,
        max_loaded_models: int,
        gc_freeze: bool,
        checkpoints: CheckpointCadence | None = None,
        compile_cache_dir: Path | None = None,
        compile_lanes: int | None = None,
    ):
        super().__init__(name, queue)
        self.device = device
        self.dtype = dtype
        self.catalog = catalog
        self.monitor = monitor
        self.admission = admission
        self.sizer = admission.sizer
        self.pipelines = PipelineCache(catalog, device, dtype, max_loaded_models, gc_freeze, admission.sizer, name)
        # the compiled denoiser, when configured: built in the background, taken up between two steps
        self.compiled = None if compile_cache_dir is None else CompiledDenoisers(name, device, dtype, compile_cache_dir,
                                                                                 compile_lanes)
        if self.compiled is not None:
            self.pipelines.unloaded.append(self.compiled.forget)
        self.trace: deque[dict] = deque(maxlen=4096)  # share group -> images, per forward: the scheduler's recent past
        self.counters = WorkerCounters()
        self.resizes: Counter = Counter()  # batch (sizing group) -> size changes while its images were in flight
        self.seconds_per_step: float | None = None
        self.seconds_per_decode: float | None = None
        self._reported_capacity: int | None = None  # the size the groups in flight were last counted at
        self.active = ActiveSet(name, queue, self.pipelines, events, mark_on_device, self.counters, monitor)
        # called on this thread after each forward, before the step boundary: the supported way for tests and
        # profilers to observe or hold a step (`embedded_worker.testing.on_step`); empty in production
        self.step_hooks: list[Callable[["DeviceWorker"], None]] = []
        self._stream = None  # this worker's CUDA stream, made on its own thread
        self.checkpoints = checkpoints  # None: nothing is checkpointed (no durable state)

    # ---- other threads -------------------------------------------------------------------

    @property
    def loading(self) -> str | None:
        return self.pipelines.loading

    @property
    def load_errors(self) -> dict[str, str]:
        return self.pipelines.load_errors

    @property
    def active_images(self) -> int:
        return self.active.size

    @property
    def capacity(self) -> int:
        return self.admission.capacity

    def status(self) -> dict:
        return {
            "name": self.name,
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "loaded_models": self.pipelines.loaded(),
            "active_images": self.active_images,
            "capacity": self.capacity,
            "seconds_per_step": self.seconds_per_step,
            "forwards": self.counters.forwards,
            "images_done": self.counters.images_done,
            "cohorts_started": self.counters.cohorts_started,
            "preemptions": self.counters.preemptions,
            "preempted_images": self.counters.preempted_images,
            "out_of_memory_events": self.counters.out_of_memory,
            "checkpoints": None if self.checkpoints is None else {
                "interval_steps": self.checkpoints.interval_steps,
                "images_taken": self.checkpoints.images_taken,
                "capture_seconds_per_image": self.checkpoints.capture_seconds,
                "resumed_images": self.counters.resumed_images,
                "steps_restored": self.counters.steps_restored,
                "steps_recomputed_at_most": self.counters.steps_recomputed_at_most,
                "refused": self.counters.checkpoints_refused,
            },
            "denoiser": {"path": "eager", "compile": "off"} if self.compiled is None else self.compiled.status(),
        }

    # ---- the worker thread -----------------------------------------------------------------

    def _run(self) -> None:
        # each worker its own CUDA stream, so parallel workers on one GPU overlap instead of queueing
        stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._stream = stream
        with torch.inference_mode(), (torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()):
            while True:
                admitted = self._admit()
                if admitted is None:
                    break
                try:
                    self._run_calls()
                    self.active.join(admitted)
                    self.active.let_leave(self._eta_after_preemption)
                    if self.active.cohorts:
                        self._step()
                        if self.checkpoints is not None:
                            self.checkpoints.after_step(self.active.cohorts, self.active_images,
                                                        self.seconds_per_step)
                        self._finish()
                except Exception as error:  # a bug must cost the images in flight, never the device thread
                    log.exception("%s: unexpected error; failing the images in flight", self.name)
                    self.active.fail_all(error, also=admitted)
        self._shutdown()

    def _admit(self) -> list[DenoiseTask] | None:
        """Wait for work, then take what fits in the next forward; None when stopping."""
        with self.queue.cond:
            while True:
                if self._stopping:
                    return None
                if self._calls:
                    return []
                taken, wait = self.admission.decide(self.active.tasks())
                if taken is None:
                    self.queue.cond.wait(wait)
                    continue
                for task in taken:
                    task.mark_active(self.name)
                return taken

    def _eta_after_preemption(self, task: DenoiseTask) -> float | None:
        """A preempted image's ETA counts its wait: until the images that stay have run out their steps
        (the longest of them), then its own remaining steps and its decode."""
        if self.seconds_per_step is None:
            return None
        staying = [t for t in self.active.tasks() if t is not task and t.leaving is None]
        wait = max((t.total_steps - t.step for t in staying), default=0)
        own = task.total_steps - task.step
        return (wait + own) * self.seconds_per_step + (self.seconds_per_decode or 0.0)

    def pipeline(self, model_id: str) -> tuple:
        """(pipe, family) for `model_id`; on this thread only."""
        return self.pipelines.get(model_id)

    def load(self, model_id: str) -> None:
        self.pipelines.get(model_id)

    def unload(self, model_id: str) -> bool:
        return self.pipelines.unload(model_id)

    def _step(self) -> None:
        admission = self.admission
        key, images = admission.key, self.active_images
        if self.capacity != self._reported_capacity:
            if self._reported_capacity is not None:
                self.resizes.update(self.active.groups())
            self._reported_capacity = self.capacity
        cohorts = self.active.cohorts
        spec = cohorts[0].specs[0]
        pipe, family = self.pipeline(spec.model_id)
        compiled = None
        if self.compiled is not None:
            # buckets follow the device's capacity, not this step's images: the cap, and with it the set of
            # graphs, stays put while cohorts grow and shrink (it moves only when memory resizes the capacity)
            folder, rows_per_image = self.catalog.folder(spec.model_id), 2 if cohorts[0].classifier_free else 1
            compiled = lambda chunks, max_rows: self.compiled.for_step(  # noqa: E731
                spec.model_id, folder, family, spec, chunks, max(max_rows, self.capacity * rows_per_image))
        try:
            elapsed, chunk = forward(pipe, cohorts, min(images, self.capacity), key, self.monitor, self._stream,
                                     self._shrink, compiled)
        except Exception as error:
            self.active.fail_all(error)
            return
        self.sizer.clean_forward(key)
        if chunk == images:
            admission.forward_times.record(key, images, elapsed)
        self.trace.append(dict(Counter(str(t.share_group) for t in self.active.tasks())))
        self.counters.forwards += -(-images // chunk)
        self.counters.steps += 1
        for hook in self.step_hooks:
            hook(self)
        self.seconds_per_step = smoothed(self.seconds_per_step, elapsed)
        decode_seconds = self.seconds_per_decode or 0.0
        for cohort in cohorts:
            remaining = cohort.total_steps - cohort.step_index
            for task in cohort.members:
                task.step = cohort.step_index
                task.eta_seconds = remaining * self.seconds_per_step + decode_seconds
        self.active.tell(lambda listener, task: listener.task_stepped(task), self.active.tasks(),
                         once_per_listener=True)

    def _shrink(self, chunk: int) -> int:
        """Out of memory at `chunk`: the next, smaller chunk; the capacity follows and the batches in flight
        count it."""
        self.counters.out_of_memory += 1
        release_memory(self.device)
        if chunk == 1:
            return 1
        chunk = self.sizer.out_of_memory(self.admission.key, chunk)
        self.admission.capacity = self._reported_capacity = chunk
        self.admission.capacity_reason = "out_of_memory"
        self.resizes.update(self.active.groups())
        return chunk

    def _finish(self) -> None:
        for cohort in self.active.take_finished():
            pipe = self.pipeline(cohort.specs[0].model_id)[0]
            try:
                images, per_image = decode(pipe, cohort, max(1, self.capacity), self._count_out_of_memory)
            except Exception as error:
                self.active.fail(cohort.members, error)
                continue
            self.seconds_per_decode = smoothed(self.seconds_per_decode, per_image)
            for task, pixels in zip(cohort.members, images):
                with self.queue.cond:
                    task.state = DONE
                task.step = task.total_steps
                task.eta_seconds = 0.0
                task.finished_at = time.monotonic()
                self.counters.images_done += 1
                if not task.future.done():
                    task.future.set_result(pixels)

    def _count_out_of_memory(self) -> None:
        self.counters.out_of_memory += 1
        release_memory(self.device)

    def _shutdown(self) -> None:
        self._refuse_calls()
        if self.suspending and self.checkpoints is not None:
            for cohort in self.active.cohorts:  # a suspend costs no step: they continue here at the next start
                self.checkpoints.take(cohort)
        self.active.fail_all(Unavailable("the worker closed before this image finished"))
        self.active.store_left()
        if self.compiled is not None:
            self.compiled.close()
        self.pipelines.clear()
