"""ActiveSet: the images on one device between two steps, in cohorts; where they join, leave and end.

A cohort is a group of images that share a schedule and started together
(`denoise.Cohort`); the active set holds the cohorts of one forward key,
and every step is one forward over all of them. At a boundary:
- images join: fresh ones in new cohorts by schedule, resumed or preempted
  ones with the cohort they parked with, checkpointed ones (a restart's)
  in a cohort restored from their checkpoint, at its step. Before any work on them, they are
  stored as on the device, and the records whose images left the device
  since the last start as off it (`mark_on_device`: the device thread's one
  write, so a crash in what follows blames the images that were there and
  only those), then their listeners hear `task_started`;
- images asked to leave (`DenoiseTask.leaving`) leave: cancelled ones end,
  paused ones park with their own cohort (state and all), preempted ones go
  back to the queue at their old rank with it and resume from that step.
Listeners hear everything on the lifecycle loop (`tell`), in order;
the device thread never waits for them.
"""

from __future__ import annotations

import itertools
import logging
from concurrent.futures import Executor
from typing import TYPE_CHECKING, Callable

from ..errors import Cancelled, InternalError, Unavailable, WorkerError
from .conditioning import join_conditioning
from .denoise import start_cohort
from .denoise_state import DenoiseState
from .resume_points import OffloadedState
from .task import CANCEL, DONE, PARKED, PAUSE, PREEMPT, DenoiseTask

if TYPE_CHECKING:
    from .denoise import Cohort
    from .memory import MemoryMonitor
    from .pipelines import PipelineCache
    from .work_queue import WorkQueue

log = logging.getLogger("embedded_worker.device")
_cohort_ids = itertools.count(1)
OnDeviceMark = Callable[[list[DenoiseTask], set[str]], None]  # (starting, records that left)


class ActiveSet:
    def __init__(self, name: str, queue: WorkQueue, pipelines: PipelineCache, events: Executor,
                 mark_on_device: OnDeviceMark, counters, monitor: MemoryMonitor):
        self.name = name
        self.queue = queue
        self.pipelines = pipelines
        self.events = events  # one thread, shared by the pool's workers
        self.mark_on_device = mark_on_device
        self.counters = counters
        self.monitor = monitor
        # paused images' states go to host memory: on an accelerator (on the CPU they are there already)
        self.offload_parked = pipelines.device.type != "cpu"
        self.cohorts: list[Cohort] = []  # the worker's thread only
        self._left: set[str] = set()  # records whose images left since the last start; the thread only

    @property
    def size(self) -> int:
        return sum(c.size for c in list(self.cohorts))

    def tasks(self) -> list[DenoiseTask]:
        return [t for c in list(self.cohorts) for t in c.members]

    def groups(self) -> set:
        return {t.sizing.group for t in self.tasks() if t.sizing is not None}

    def join(self, tasks: list[DenoiseTask]) -> None:
        """Put admitted tasks into cohorts: resumed ones bring theirs, fresh ones share by schedule."""
        if not tasks:
            return
        still_here = {t.record_id for t in self.tasks() + tasks}
        announce_start(self.name, tasks, self._left - still_here, self.mark_on_device, self.tell)
        self._left.clear()
        fresh: dict[tuple, list[DenoiseTask]] = {}
        for task in tasks:
            if task.parked is not None:
                self.cohorts.append(task.parked)
                task.parked = None
            elif task.resume_from is not None and self._restore(task):
                continue
            else:
                fresh.setdefault(task.spec.schedule_key(), []).append(task)
        for members in fresh.values():
            try:
                pipe, _ = self.pipelines.get(members[0].spec.model_id)
                specs = [t.spec for t in members]
                conditioning = join_conditioning([self.pipelines.conditioning(pipe, s) for s in specs])
                cohort = start_cohort(pipe, members, specs, conditioning)
            except Exception as error:  # a bad model or input fails these images only
                self.fail(members, error)
                continue
            self.counters.cohorts_started += 1
            self.cohorts.append(cohort)
            cohort_id = next(_cohort_ids)
            for task in members:
                task.total_steps = cohort.total_steps
                task.cohort_id = cohort_id

    def _restore(self, task: DenoiseTask) -> bool:
        """A checkpointed image continues at its checkpoint's step, in a cohort of its own; False (logged, and
        it starts from step 0) when the checkpoint cannot be used."""
        stored, task.resume_from = task.resume_from, None
        stored.release()
        try:
            pipe, _ = self.pipelines.get(task.spec.model_id)
            conditioning = join_conditioning([self.pipelines.conditioning(pipe, task.spec)])
            state = DenoiseState.from_bytes(stored.read())
            cohort = state.restore(pipe, task, task.spec, conditioning, self.pipelines.device)
        except Exception as error:  # unreadable, torn, refused: this image starts again, nothing else is touched
            self.counters.checkpoints_refused += 1
            log.warning("%s: image %s of %s starts from step 0: its checkpoint at step %d cannot be used (%s)",
                        self.name, task.checkpoint_key, task.record_id, stored.step, error)
            return False
        self.cohorts.append(cohort)
        task.resumed_from_step = task.step = cohort.step_index
        task.total_steps = cohort.total_steps
        task.cohort_id = next(_cohort_ids)
        self.counters.resumed_images += 1
        self.counters.steps_restored += cohort.step_index
        self.counters.steps_recomputed_at_most += state.interval
        return True

    def let_leave(self, eta_after_preemption: Callable[[DenoiseTask], float | None]) -> None:
        """Pauses, cancels and preemptions take effect here, at a step boundary, all under the queue's lock:
        a resume clears a pause under it, so it comes before this boundary (the image stays) or after it
        (the image is parked with its cohort and goes back to the queue). Read apart, a pause called off
        in between left its image with no reason, failed as if the worker had closed."""
        kept: list[Cohort] = []
        with self.queue.cond:
            for cohort in self.cohorts:
                leaving = [i for i, t in enumerate(cohort.members) if t.leaving is not None]
                if not leaving:
                    kept.append(cohort)
                    continue
                staying = cohort.size - len(leaving)
                for position in reversed(leaving):
                    task = cohort.members[position]
                    alone = cohort if staying == 0 and cohort.size == 1 else cohort.split_off([position])
                    self._leave(task, alone, eta_after_preemption)
                if staying:
                    kept.append(cohort)
        self.cohorts = kept

    def _leave(self, task: DenoiseTask, cohort: Cohort, eta_after_preemption) -> None:
        """Cancelled: done. Paused: parked with its cohort. Preempted: back in the queue with its cohort,
        at its old rank, still `running` to its run. Under the queue's lock (`let_leave`)."""
        self._left.add(task.record_id)
        with self.queue.cond:
            reason, task.leaving = task.leaving, None
            if reason == PREEMPT and not self.queue.closed:
                task.parked = cohort
                task.preemptions += 1
                if task.preemptions == 1:
                    self.counters.preempted_images += 1
                task.parked_at_step = task.step
                task.waiting_for_device = f"waiting for the device (preempted by {task.preempted_by})"
                task.eta_seconds = eta_after_preemption(task)
                self.counters.preemptions += 1
                self.queue.put(task)
                return
            if reason == PAUSE:
                task.state = PARKED
                task.parked = cohort
                if self.offload_parked:
                    self._offload(task)
            else:
                task.state = DONE
        if reason == PAUSE:
            self.tell(lambda listener, parked: listener.task_parked(parked), [task])
        elif not task.future.done():
            task.future.set_exception(Cancelled("cancelled") if reason == CANCEL
                                      else Unavailable("the worker closed before this image finished"))

    def _offload(self, task: DenoiseTask) -> None:
        """A paused image may wait for hours: its state leaves device memory for host memory (as bytes, the
        monitor counting them) and is restored, exactly, when it is admitted again."""
        state = DenoiseState.capture(task.parked)[0]
        task.parked, task.resume_from = None, OffloadedState(state.step_index, state.to_bytes(), self.monitor)
        self.monitor.parked_host_bytes += len(task.resume_from.data)

    def take_finished(self) -> list[Cohort]:
        done = [c for c in self.cohorts if c.finished]
        if done:
            self.cohorts = [c for c in self.cohorts if not c.finished]
            self._left.update(t.record_id for c in done for t in c.members)
        return done

    def fail(self, tasks: list[DenoiseTask], error: BaseException) -> None:
        if not isinstance(error, WorkerError):
            log.exception("%s: denoising failed", self.name, exc_info=error)
            error = InternalError(f"{type(error).__name__}: {error}")
        for task in tasks:
            self._left.add(task.record_id)
            with self.queue.cond:
                task.state = DONE
            if not task.future.done():
                task.future.set_exception(error)

    def fail_all(self, error: BaseException, also: list[DenoiseTask] = ()) -> None:
        tasks, self.cohorts = self.tasks() + list(also), []
        self.fail(tasks, error)

    def store_left(self) -> None:
        """The thread ends: the records whose images left since the last start are stored as off the device
        now, not at a next start that never comes, so the next process does not take a close for a crash
        under them (two such closes quarantined a session)."""
        if self._left:
            try:
                self.mark_on_device([], set(self._left))
            except Exception:
                log.exception("%s: the off-device mark could not be stored", self.name)
            self._left.clear()

    def tell(self, tell: Callable, tasks: list[DenoiseTask], once_per_listener: bool = False) -> None:
        """Hand `tell(listener, task)` for each task to the lifecycle loop: the device goes on at once."""
        self.events.submit(tell_listeners, self.name, tell, tasks, once_per_listener)


def announce_start(worker: str, tasks: list[DenoiseTask], left: set[str], mark_on_device: OnDeviceMark,
                   tell: Callable) -> None:
    """Images start on a device: stored as on it before any work on them, and the records in `left` as
    off it (if the process dies in what follows, the next start knows which images were there and treats
    them as suspects), then their listeners hear `task_started`."""
    try:
        mark_on_device(tasks, left)
    except Exception:
        log.exception("%s: the on-device mark could not be stored", worker)
    tell(lambda listener, task: listener.task_started(task), tasks)


def tell_listeners(worker: str, tell: Callable, tasks: list[DenoiseTask], once_per_listener: bool) -> None:
    """On the lifecycle loop: each task's listener hears `tell` (once per listener when asked)."""
    told: set[int] = set()
    for task in tasks:
        listener = task.listener
        if listener is None or (once_per_listener and id(listener) in told):
            continue
        told.add(id(listener))
        try:
            tell(listener, task)
        except Exception:  # a listener bug must not stop the events of others
            log.exception("%s: a listener of an image (seed %s) failed", worker, task.spec.seed)
