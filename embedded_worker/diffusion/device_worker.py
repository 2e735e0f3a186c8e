"""DeviceWorker: one named thread that drives one device, one denoising step at a time.

Design notes
- Iteration-level batching: between any two steps the worker admits queued
  images into its active set, and pauses, cancels and finishes others. Every
  step is one UNet forward over all active images, whatever request each came
  from, so eight single-image sessions cost about one batch of eight, and a
  request that arrives mid-run joins at the next step instead of waiting for
  the whole run to end.
- The active set holds one forward key (model, size, guidance mode) at a
  time. When a more urgent task of another key waits, the worker stops
  admitting and drains, then switches: urgency decides, aging prevents
  starvation.
- A pipeline belongs to its worker and is touched from this thread only
  (pipelines are not thread-safe). Model loads and unloads asked for by
  other threads run here between steps (`call`).
- Preemption (`scheduling.preempt`): when the active set is full and a
  waiting image should run before one in it (a higher priority whose aged
  rank is also better, or under `fair` an owner with far fewer images in
  flight), the less urgent image leaves at the next step boundary exactly
  as a pause leaves (its own cohort, state and all, memory still counted),
  and goes back to the queue at its old rank; it resumes from the same step.
  Not again before it made a step of progress, and never for less than one
  step of gain. All of it is decided in `_admit`, in one place.
- Cost-aware admission: while images of a higher priority run, lower ones
  join their forward only while that costs the urgent images less than one
  of their steps over their remaining run, judged on learned seconds per
  forward against its size (`ForwardTimes`): on a GPU they mostly join, on a
  CPU the urgent images mostly run alone.
- Out of memory: the step is retried in smaller chunks (latents are only
  changed once every chunk succeeded), so no image is lost or run twice.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import logging
import threading
import time
from collections import Counter, OrderedDict, deque
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import Cancelled, InternalError, ResourceExhausted, Unavailable, WorkerError, is_out_of_memory
from .denoise import Cohort, Conditioning, decode_pixels, encode_prompt, join_conditioning, predict_noise, start_cohort
from .memory import BatchSizer, ForwardTimes, MemoryMonitor
from .models import ModelCatalog, load_pipeline
from .task import DONE, PARKED, DenoiseTask
from .work_queue import WorkQueue

log = logging.getLogger("embedded_worker.device")

PROMPT_CACHE_SIZE = 64
_cohort_ids = itertools.count(1)
ResizeHook = Callable[[set, int, str], None]


@dataclass
class WorkerCounters:
    forwards: int = 0
    preemptions: int = 0
    steps: int = 0
    images_done: int = 0
    cohorts_started: int = 0
    out_of_memory: int = 0


class DeviceWorker:
    def __init__(
        self,
        name: str,
        device: torch.device,
        dtype: torch.dtype,
        queue: WorkQueue,
        catalog: ModelCatalog,
        monitor: MemoryMonitor,
        sizer: BatchSizer,
        coalesce_wait_s: float,
        max_loaded_models: int,
        gc_freeze: bool,
        on_resize: ResizeHook,
        preempt: bool = False,
    ):
        self.name = name
        self.device = device
        self.dtype = dtype
        self.queue = queue
        self.catalog = catalog
        self.monitor = monitor
        self.sizer = sizer
        self.coalesce_wait_s = coalesce_wait_s
        self.max_loaded_models = max_loaded_models
        self.gc_freeze = gc_freeze
        self.on_resize = on_resize
        self.preempt = preempt
        self.forward_times = ForwardTimes()
        self.trace: deque[dict] = deque(maxlen=4096)  # owner -> images, per forward: the scheduler's recent past
        self.counters = WorkerCounters()
        self.seconds_per_step: float | None = None
        self.seconds_per_decode: float | None = None
        self.capacity = sizer.max_batch_size
        self._capacity_reason = "configured"
        self._reported_capacity: int | None = None  # the size the groups in flight were last told of
        self._pipes: OrderedDict[str, tuple] = OrderedDict()  # model id -> (pipe, family); this thread only
        self.loading: str | None = None  # the model being loaded now; written here, read by status calls
        self.load_errors: dict[str, str] = {}  # model id -> why its last load failed; written here only
        self._prompts: OrderedDict[tuple, Conditioning] = OrderedDict()  # this thread only
        self._cohorts: list[Cohort] = []  # this thread only
        self._key: tuple | None = None
        self._calls: deque[tuple[Callable, Future]] = deque()  # guarded by queue.cond
        self._stopping = False  # guarded by queue.cond
        self._stream = None  # this worker's CUDA stream, made on its own thread
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)

    # ---- other threads -------------------------------------------------------------------

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        with self.queue.cond:
            self._stopping = True
            self.queue.cond.notify_all()

    def call(self, fn: Callable) -> Future:
        """Run `fn(worker)` on this worker's thread between two steps."""
        future: Future = Future()
        with self.queue.cond:
            if self._stopping:
                future.set_exception(Unavailable("the worker is closing"))
                return future
            self._calls.append((fn, future))
            self.queue.cond.notify_all()
        return future

    @property
    def active_images(self) -> int:
        return sum(c.size for c in list(self._cohorts))

    def status(self) -> dict:
        return {
            "name": self.name,
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "loaded_models": list(self._pipes),
            "active_images": self.active_images,
            "capacity": self.capacity,
            "seconds_per_step": self.seconds_per_step,
            "forwards": self.counters.forwards,
            "images_done": self.counters.images_done,
            "cohorts_started": self.counters.cohorts_started,
            "preemptions": self.counters.preemptions,
            "out_of_memory_events": self.counters.out_of_memory,
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
                    self._start(admitted)
                    self._apply_controls()
                    if self._cohorts:
                        self._step()
                        self._finish()
                except Exception as error:  # a bug must cost the images in flight, never the device thread
                    log.exception("%s: unexpected error; failing the images in flight", self.name)
                    self._fail([t for c in self._cohorts for t in c.members] + admitted, error)
                    self._cohorts = []
        self._shutdown()

    def _admit(self) -> list[DenoiseTask] | None:
        """Wait for work, then take what fits in the next forward; None when stopping."""
        queue = self.queue
        coalesce_until = None
        with queue.cond:
            while True:
                if self._stopping:
                    return None
                if self._calls:
                    return []
                active = self.active_images
                if active == 0:
                    key = queue.best_key()
                    if key is None:
                        self._key = None
                        queue.cond.wait()
                        continue
                    capacity, _ = self.sizer.size(key, *self._preferences(queue.peek(key)))
                    if self.coalesce_wait_s > 0 and queue.count(key) < capacity:
                        now = time.monotonic()
                        coalesce_until = coalesce_until or now + self.coalesce_wait_s
                        if now < coalesce_until:
                            queue.cond.wait(coalesce_until - now)
                            continue
                    self._key = key
                elif queue.outranked(self._key):
                    if self.preempt:  # park what the other key's best outranks; drain the rest
                        urgent = queue.peek(queue.best_key())
                        for task in self._preemptible():
                            if _outranks(urgent, task):
                                task.preempt_requested, task.preempted_by = True, "higher priority"
                    return []  # drain the active set, then switch to the more urgent key
                minimum, threshold = self._preferences(queue.peek(self._key))
                self.capacity, self._capacity_reason = self.sizer.size(self._key, minimum, threshold)
                in_flight = Counter(t.owner for c in self._cohorts for t in c.members)
                limit = self.capacity - active
                if self.preempt and active:
                    limit = self._preempt_for(queue, in_flight, limit)
                taken = queue.take(self._key, limit, self._acceptor(), in_flight)
                for task in taken:
                    task.mark_active(self.name)
                return taken

    def _preemptible(self) -> list[DenoiseTask]:
        """Active images that may be parked now: not alone by isolation, not already leaving, progressed
        since they were last parked, and with more than one step left (a last step gains nobody anything)."""
        active = [t for c in self._cohorts for t in c.members]
        if any(t.isolated for t in active):
            return []
        return [t for t in active
                if not (t.cancel_requested or t.pause_requested or t.preempt_requested)
                and (t.parked_at_step is None or t.step > t.parked_at_step)
                and t.total_steps - t.step > 1]

    def _preempt_for(self, queue: WorkQueue, in_flight: Counter, free: int) -> int:
        """Choose who leaves this boundary for whom; mark them and return how many images to admit.

        Walk the waiting images in the order the queue would admit them: each
        takes a free place, else displaces the least urgent active image it may
        (`_displaces`). Then, if the forward now mixes priorities, cap it at the
        size the urgent images' learned cost allows (`_forward_target`), parking
        lower-priority images beyond it. Call with `queue.cond` held."""
        active = [t for c in self._cohorts for t in c.members]
        waiting = queue.preview(self._key, self.capacity, in_flight)
        counts = Counter(in_flight)
        places = free
        eligible = self._preemptible()
        victims: list[DenoiseTask] = []
        admitted: list[DenoiseTask] = []
        for task in waiting:
            if free <= 0:
                pool = [v for v in eligible if v not in victims and self._displaces(task, v, counts)]
                if not pool:
                    break
                victim = max(pool, key=lambda v: (-v.priority, counts[v.owner], v.rank))
                victims.append(victim)
                counts[victim.owner] -= 1
                free += 1
                places += 1
            free -= 1
            admitted.append(task)
            counts[task.owner] += 1
        staying = [t for t in active if t not in victims]
        present = staying + admitted + [t for t in waiting if t not in admitted]
        top = max((t.priority for t in staying + admitted), default=None)
        if top is not None and any(t.priority < top for t in present):
            urgent = [t for t in staying + waiting if t.priority == top][: self.capacity]
            remaining = max(t.total_steps - t.step for t in urgent)
            target = max(len(urgent), self._forward_target(len(urgent), remaining))
            joining = sum(1 for t in urgent if t not in staying)
            # lower-priority images beyond the target leave, least urgent first
            lower = sorted((t for t in staying if t.priority < top and t in eligible), key=lambda t: t.rank)
            while len(staying) + joining > target and lower:
                victim = lower.pop()
                victims.append(victim)
                staying.remove(victim)
            places = max(0, target - len(staying))
        for victim in victims:
            victim.preempt_requested = True
            displaced_by_rank = any(_outranks(t, victim) for t in admitted) or victim.priority < (top or 0)
            victim.preempted_by = "higher priority" if displaced_by_rank else "fair share"
        return places

    def _eta_after_preemption(self, task: DenoiseTask) -> float | None:
        """A preempted image's ETA counts its wait: until the images that stay have run out their steps
        (the longest of them), then its own remaining steps and its decode."""
        if self.seconds_per_step is None:
            return None
        staying = [t for c in self._cohorts for t in c.members if t is not task and not t.preempt_requested]
        wait = max((t.total_steps - t.step for t in staying), default=0)
        own = task.total_steps - task.step
        return (wait + own) * self.seconds_per_step + (self.seconds_per_decode or 0.0)

    def _displaces(self, waiting: DenoiseTask, active: DenoiseTask, counts: Counter) -> bool:
        """May `waiting` take `active`'s place now? More urgent, or (fair) an owner well under its share."""
        if _outranks(waiting, active):
            return True
        return (self.queue.policy == "fair" and waiting.priority == active.priority
                and waiting.owner != active.owner and counts[active.owner] > counts[waiting.owner] + 1)

    def _forward_target(self, urgent: int, remaining_steps: int) -> int:
        """How many images a forward may hold while `urgent` images of a higher priority run in it:
        the most that cost them less than one of their steps over their remaining run, by learned
        seconds per forward. Unmeasured: the configured capacity (join, and learn)."""
        alone = self.forward_times.estimate(self._key, urgent)
        if alone is None:
            return self.capacity
        size = urgent
        for images in range(urgent + 1, self.capacity + 1):
            seconds = self.forward_times.estimate(self._key, images)
            if seconds is None or (seconds - alone) * remaining_steps >= alone:
                break
            size = images
        return size

    def _preferences(self, next_task: DenoiseTask | None) -> tuple[int, float | None]:
        """The strictest batch preferences among the images in flight and the next one to admit:
        (minimum size, memory threshold)."""
        tasks = [t for c in self._cohorts for t in c.members] + ([next_task] if next_task is not None else [])
        sizings = [t.sizing for t in tasks if t.sizing is not None]
        thresholds = [s.memory_threshold for s in sizings if s.memory_threshold is not None]
        return max((s.minimum for s in sizings), default=1), min(thresholds, default=None)

    def _acceptor(self) -> Callable[[DenoiseTask], bool]:
        in_group: dict[str, int] = {}
        active = [t for c in self._cohorts for t in c.members]
        for task in active:
            if task.sizing is not None:
                in_group[task.sizing.group] = in_group.get(task.sizing.group, 0) + 1
        taken: list[DenoiseTask] = []

        def accept(task: DenoiseTask) -> bool:
            # an isolated image runs alone: nothing joins it and it joins nothing
            if any(t.isolated for t in active + taken) or (task.isolated and (active or taken)):
                return False
            if not self._fits_group(task, in_group):
                return False
            taken.append(task)
            return True

        return accept

    @staticmethod
    def _fits_group(task: DenoiseTask, in_group: dict[str, int]) -> bool:
        """A batch's images take at most its `limit` places in flight."""
        if task.sizing is None:
            return True
        group = task.sizing.group
        if in_group.get(group, 0) >= task.sizing.limit:
            return False
        in_group[group] = in_group.get(group, 0) + 1
        return True

    def _run_calls(self) -> None:
        with self.queue.cond:
            calls = list(self._calls)
            self._calls.clear()
        for fn, future in calls:
            try:
                future.set_result(fn(self))
            except BaseException as error:  # handed to the caller, who turns it into an envelope
                future.set_exception(error)

    def pipeline(self, model_id: str) -> tuple:
        """(pipe, family) for `model_id`, loading it here, least recently used evicted."""
        if model_id in self._pipes:
            self._pipes.move_to_end(model_id)
            return self._pipes[model_id]
        while len(self._pipes) >= self.max_loaded_models:
            self.unload(next(iter(self._pipes)))
        folder = self.catalog.folder(model_id)
        started = time.perf_counter()
        self.loading = model_id
        try:
            pipe = load_pipeline(folder, self.device, self.dtype)
        except Exception as error:
            failure: WorkerError = (
                ResourceExhausted(f"model '{model_id}' does not fit in {self.device} memory")
                if is_out_of_memory(error) else
                Unavailable(f"model '{model_id}' could not be loaded from {folder}: {type(error).__name__}: {error}"))
            self.load_errors[model_id] = failure.message
            raise failure from error
        finally:
            self.loading = None
        family = self.catalog.family(model_id)
        self._pipes[model_id] = (pipe, family)
        self.load_errors.pop(model_id, None)
        log.info("%s loaded %s in %.2f s", self.name, model_id, time.perf_counter() - started)
        if self.gc_freeze:
            gc.collect()
            gc.freeze()  # a full collection over the model's objects held the GIL ~200 ms
        return self._pipes[model_id]

    def unload(self, model_id: str) -> bool:
        if self._pipes.pop(model_id, None) is None:
            return False
        self._prompts = OrderedDict((k, v) for k, v in self._prompts.items() if k[0] != model_id)
        gc.unfreeze()
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        self.sizer.forget()
        return True

    def _start(self, tasks: list[DenoiseTask]) -> None:
        """Put admitted tasks into cohorts: resumed ones bring theirs, fresh ones share by schedule."""
        fresh: dict[tuple, list[DenoiseTask]] = {}
        for task in tasks:
            if task.parked is not None:
                self._cohorts.append(task.parked)
                task.parked = None
                self._notify(task, "task_started")
            else:
                fresh.setdefault(task.spec.schedule_key(), []).append(task)
        for members in fresh.values():
            for task in members:
                # running (and so stored) before any work on it: if the process dies in what follows, the
                # next start knows which images were on the device and treats them as suspects
                self._notify(task, "task_started")
            try:
                pipe, family = self.pipeline(members[0].spec.model_id)
                specs = [t.spec for t in members]
                conditioning = join_conditioning([self._conditioning(pipe, family, s) for s in specs])
                cohort = start_cohort(pipe, members, specs, conditioning)
            except Exception as error:  # a bad model or input fails these images only
                self._fail(members, error)
                continue
            self.counters.cohorts_started += 1
            self._cohorts.append(cohort)
            cohort_id = next(_cohort_ids)
            for task in members:
                task.total_steps = cohort.total_steps
                task.cohort_id = cohort_id

    def _conditioning(self, pipe, family: str, spec) -> Conditioning:
        key = (spec.model_id, spec.prompt, spec.negative_prompt, spec.uses_guidance, spec.height, spec.width)
        if key in self._prompts:
            self._prompts.move_to_end(key)
            return self._prompts[key]
        encoded = encode_prompt(pipe, family, spec)
        self._prompts[key] = encoded
        if len(self._prompts) > PROMPT_CACHE_SIZE:
            self._prompts.popitem(last=False)
        return encoded

    def _apply_controls(self) -> None:
        """Pauses and cancels take effect here, at a step boundary."""
        kept: list[Cohort] = []
        for cohort in self._cohorts:
            leaving = [i for i, t in enumerate(cohort.members)
                       if t.cancel_requested or t.pause_requested or t.preempt_requested]
            if not leaving:
                kept.append(cohort)
                continue
            staying = cohort.size - len(leaving)
            for position in reversed(leaving):
                task = cohort.members[position]
                alone = cohort if staying == 0 and cohort.size == 1 else cohort.split_off([position])
                self._leave(task, alone)
            if staying:
                kept.append(cohort)
        self._cohorts = kept

    def _leave(self, task: DenoiseTask, cohort: Cohort) -> None:
        """Cancelled: done. Paused: parked with its cohort. Preempted: back in the queue with its cohort,
        at its old rank, still `running` to its owner."""
        with self.queue.cond:
            preempted = task.preempt_requested and not (task.cancel_requested or task.pause_requested)
            task.preempt_requested = False
            if task.cancel_requested:
                task.state = DONE
            elif preempted:
                task.parked = cohort
                task.preemptions += 1
                task.parked_at_step = task.step
                task.waiting_for_device = f"waiting for the device (preempted by {task.preempted_by})"
                task.eta_seconds = self._eta_after_preemption(task)
                self.counters.preemptions += 1
                if not self.queue.closed:
                    self.queue.put(task)
                    return
                task.state = DONE
                task.parked = None
                if not task.future.done():
                    task.future.set_exception(Unavailable("the worker closed before this image finished"))
                return
            else:
                task.state = PARKED
                task.parked = cohort
                task.pause_requested = False
        if task.state != DONE:
            self._notify(task, "task_parked")
        elif not task.future.done():
            task.future.set_exception(Cancelled("cancelled"))

    def _step(self) -> None:
        key = self._key
        images = self.active_images
        if self.capacity != self._reported_capacity:
            if self._reported_capacity is not None:
                self.on_resize(self._groups(), self.capacity, self._capacity_reason)
            self._reported_capacity = self.capacity
        chunk = min(images, self.capacity)
        unet = self.pipeline(self._cohorts[0].specs[0].model_id)[0].unet
        rows_per_image = 2 if self._cohorts[0].uses_guidance else 1
        while True:
            try:
                used_before = self.monitor.begin()
                started = time.perf_counter()
                predict_noise(unet, self._cohorts, chunk * rows_per_image)
                if self._stream is not None:
                    self._stream.synchronize()
                elapsed = time.perf_counter() - started
                self.monitor.end(key, chunk, used_before)
                break
            except Exception as error:
                if not is_out_of_memory(error):
                    self._fail([t for c in self._cohorts for t in c.members], error)
                    self._cohorts = []
                    return
                self.counters.out_of_memory += 1
                self._release_memory()
                if chunk == 1:
                    self._fail([t for c in self._cohorts for t in c.members],
                               ResourceExhausted("out of device memory at batch size 1"))
                    self._cohorts = []
                    return
                chunk = self.sizer.out_of_memory(key, chunk)
                self.capacity = self._reported_capacity = chunk
                self._capacity_reason = "out_of_memory"
                self.on_resize(self._groups(), chunk, "out_of_memory")
        self.sizer.clean_forward(key)
        if chunk == images:
            self.forward_times.record(key, images, elapsed)
        self.trace.append(dict(Counter(str(t.owner) for c in self._cohorts for t in c.members)))
        self.counters.forwards += -(-images // chunk)
        self.counters.steps += 1
        self.seconds_per_step = _smoothed(self.seconds_per_step, elapsed)
        decode = self.seconds_per_decode or 0.0
        for cohort in self._cohorts:
            remaining = cohort.total_steps - cohort.step_index
            for task in cohort.members:
                task.step = cohort.step_index
                task.eta_seconds = remaining * self.seconds_per_step + decode
                self._notify(task, "task_stepped")

    def _finish(self) -> None:
        done = [c for c in self._cohorts if c.finished]
        if not done:
            return
        self._cohorts = [c for c in self._cohorts if not c.finished]
        for cohort in done:
            pipe = self.pipeline(cohort.specs[0].model_id)[0]
            chunk = max(1, self.capacity)
            while True:
                try:
                    started = time.perf_counter()
                    images = decode_pixels(pipe, cohort.latents, chunk)
                    per_image = (time.perf_counter() - started) / cohort.size
                    break
                except Exception as error:
                    if not is_out_of_memory(error) or chunk == 1:
                        self._fail(cohort.members, error)
                        images = None
                        break
                    self.counters.out_of_memory += 1
                    self._release_memory()
                    chunk //= 2
            if images is None:
                continue
            self.seconds_per_decode = _smoothed(self.seconds_per_decode, per_image)
            for task, pixels in zip(cohort.members, images):
                with self.queue.cond:
                    task.state = DONE
                task.step = task.total_steps
                task.eta_seconds = 0.0
                task.finished_at = time.monotonic()
                self.counters.images_done += 1
                if not task.future.done():
                    task.future.set_result(pixels)

    def _groups(self) -> set:
        return {t.sizing.group for c in self._cohorts for t in c.members if t.sizing is not None}

    def _release_memory(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _fail(self, tasks: list[DenoiseTask], error: BaseException) -> None:
        if not isinstance(error, WorkerError):
            log.exception("%s: denoising failed", self.name, exc_info=error)
            error = InternalError(f"{type(error).__name__}: {error}")
        for task in tasks:
            with self.queue.cond:
                task.state = DONE
            if not task.future.done():
                task.future.set_exception(error)

    def _notify(self, task: DenoiseTask, event: str) -> None:
        if task.listener is not None:
            try:
                getattr(task.listener, event)(task)
            except Exception:  # a listener bug must not stop the device
                log.exception("%s: listener %s failed", self.name, event)

    def _shutdown(self) -> None:
        with self.queue.cond:
            calls = list(self._calls)
            self._calls.clear()
        for _, future in calls:
            future.set_exception(Unavailable("the worker is closing"))
        tasks = [t for c in self._cohorts for t in c.members]
        self._cohorts = []
        self._fail(tasks, Unavailable("the worker closed before this image finished"))
        self._pipes.clear()
        self._prompts.clear()


def _outranks(waiting: DenoiseTask | None, active: DenoiseTask) -> bool:
    """More urgent both by priority and by aged rank: aging, which lifts long-waiting work, still holds."""
    return waiting is not None and waiting.priority > active.priority and waiting.rank < active.rank


def _smoothed(average: float | None, sample: float) -> float:
    """An exponential moving average: steady enough for an ETA, quick to follow a change of load."""
    return sample if average is None else 0.8 * average + 0.2 * sample
