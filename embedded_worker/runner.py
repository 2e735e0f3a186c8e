"""WorkflowRun: one execution of a RunPlan, step after step, for one owner.

Design notes
- No thread per run. A run launches a step's work (images on the DevicePool,
  or a function on the CPU pool) and continues when that work reports back.
  Continuations never run on the device thread: the device must never wait
  on postprocessing or file I/O, so they hop to the CPU pool.
- The owner (a `jobs.Job`: a session, or a batch item) hears
  `run_running`, `run_progress`, `run_paused`, `run_off_device` and, exactly
  once, `run_finished`; it owns the status, the run owns only how far the
  work has got. The run's own state is one `RunState` (`run_state.py`).
- The device worker tells a run about its images (started, stepped, parked)
  on its event thread, never its own: the device thread only launches.
- A parallel plan runs in waves (PlannedStep.wave): every step of a wave at
  once, the next wave when all of it has ended. A sequential plan is a wave
  per step, each on the images of the step before it.
- Answering steps (model load/unload, device status) run on the CPU pool:
  their answer is kept as the step's result, the images pass through.
- Pause: images on the device park at the next step boundary (their state is
  kept); a CPU step finishes, then the run waits before the next step.
  Resume continues exactly there. Cancel is final at once; images still on
  the device stop at their next step boundary and skip the VAE decode.
  What pause, resume, cancel and a launch tell the pool reaches it in the
  order they decided (`_steering`): a launch parking its images for a pause
  must not overtake a resume, or they would stay parked under a running run,
  and a launch after a cancel submits nothing (its images would run for
  nobody, ahead of live work).
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Executor, Future
from typing import Callable, Protocol

from .diffusion.device_pool import DevicePool
from .diffusion.task import PARKED, BatchSizing, DenoiseTask
from .errors import Cancelled, InvalidRequest, WorkerError
from .operations import BatchProcessParams, StepImage, image_specs
from .planning import PlannedStep, RunPlan
from .run_state import RunState, can_move
from .step_work import StepWork, aggregate_errors, as_worker_error, describe_steps, image_metadata

log = logging.getLogger("embedded_worker.runner")


class RunOwner(Protocol):
    """What a run tells the job it works for (`jobs.Job`)."""

    def run_running(self, run: "WorkflowRun") -> None: ...

    def run_off_device(self, run: "WorkflowRun") -> None: ...

    def run_progress(self, run: "WorkflowRun") -> None: ...

    def run_paused(self, run: "WorkflowRun") -> None: ...

    def run_finished(self, run: "WorkflowRun", images: list[StepImage], error: WorkerError | None) -> None: ...


class WorkflowRun:
    def __init__(
        self,
        plan: RunPlan,
        owner: RunOwner,
        pool: DevicePool,
        cpu: Executor,
        native_size: Callable[[str], tuple[int, int]],
        *,
        record_id: str,
        priority: int,
        sizing: BatchSizing | None = None,
        isolated: bool = False,
    ):
        self.plan = plan
        self.owner = owner
        self.pool = pool
        self.cpu = cpu
        self.native_size = native_size  # model id -> (width, height) it was trained at
        self.record_id = record_id  # whose images these are: named in the store while they are on a device
        self.priority = priority
        self.sizing = sizing
        self.isolated = isolated
        self.submitted_at = time.monotonic()  # its images queue in the order their requests came
        # guards everything below: device, event and CPU threads report here concurrently
        self._lock = threading.RLock()
        self._steering = threading.Lock()  # pool calls in the order of the decisions (design notes)
        self.state = RunState.ACTIVE
        self.error: WorkerError | None = None  # how it ended, once ENDED (None: it succeeded)
        self.next_step = 0
        self.images: list[StepImage] = []
        self.work: list[StepWork] = []  # the steps in flight; empty between two steps
        self.launched: dict[int, StepWork] = {}  # PlannedStep.order -> its work, for step results
        self.all_tasks: list[DenoiseTask] = []  # every image this run sent to a device, for metrics
        self.completed_steps = 0
        self._weights = [step.weight for step in plan.steps]  # progress shares, fixed for the run
        self._in_request_order = sorted(plan.steps, key=lambda s: s.order)
        self._ended_results: list[dict] | None = None  # step_results once the run ended: polled, never changing
        self._total_weight = max(1, sum(self._weights))

    def _move(self, target: RunState) -> bool:
        """Call with `_lock` held; False when the run cannot go there from where it is."""
        if not can_move(self.state, target):
            return False
        self.state = target
        return True

    @property
    def ended(self) -> bool:
        return self.state is RunState.ENDED

    @property
    def pause_requested(self) -> bool:
        return self.state in (RunState.PAUSING, RunState.PAUSED)

    # ---- control, from any thread --------------------------------------------------------

    def start(self, paused: bool = False) -> None:
        """Begin with the first step, or (paused) wait before it until `resume`."""
        if paused:
            with self._lock:
                if not self.ended:  # recovered paused: nothing launched yet, `resume` begins it
                    self.state = RunState.PAUSED
            return
        self.cpu.submit(self._launch_next)

    def pause(self) -> None:
        """Park every image at its next step boundary; `run_paused` follows once all are parked."""
        if self._steer(RunState.PAUSING, self.pool.pause) is not None:
            self._become_paused()  # nothing on the device and no CPU step: paused at once

    def resume(self) -> None:
        if self._steer(RunState.ACTIVE, self.pool.resume):  # paused between two steps: the next one begins
            self.cpu.submit(self._launch_next)

    def _steer(self, target: RunState, tell: Callable[[DenoiseTask], None],
               error: WorkerError | None = None) -> bool | None:
        """Move to `target` (ENDED: with `error`), then tell the pool about every image still out; whether the
        run was paused between two steps (None: it cannot go there)."""
        with self._steering:
            with self._lock:
                between_steps = self.state is RunState.PAUSED and not self.work
                if not self._move(target):
                    return None
                if target is RunState.ENDED:
                    self.error = error
                tasks = self._live_tasks()
            for task in tasks:
                tell(task)
        return between_steps

    def cancel(self) -> None:
        """Final at once: the run ends under `_steering`, so a launch either sees it and submits nothing, or
        came first and its images are among those cancelled here."""
        if self._steer(RunState.ENDED, self.pool.cancel, Cancelled("cancelled")) is not None:
            self._tell_finished([])

    # ---- progress, read by status calls ---------------------------------------------------

    @property
    def current_step(self) -> int:
        """1-based index of the step in progress (or the last one, when done)."""
        return min(self.completed_steps + 1, len(self.plan.steps))

    @property
    def current_operation(self) -> str:
        """The step under way; a step whose unfinished images were all preempted says it waits, and why."""
        work = self.work
        if work:
            labels = []
            for w in work:
                waiting = [t.waiting_for_device for t in w.tasks if not t.future.done()]
                labels.append(f"{w.step.label}: {waiting[0]}" if waiting and all(waiting) else w.step.label)
            return "+".join(labels)
        index = min(self.next_step, len(self.plan.steps) - 1)
        return self.plan.steps[index].label

    @property
    def substep_progress(self) -> float:
        work = self.work
        return sum(w.fraction for w in work) / len(work) if work else 0.0

    @property
    def progress(self) -> float:
        """0..1 over all steps, each weighted (PlannedStep.weight), counting the denoising inside."""
        if self.ended and self.error is None:
            return 1.0
        work = self.work
        running = sum(w.step.weight * w.fraction for w in work) if work else 0.0
        return min(1.0, (sum(self._weights[: self.completed_steps]) + running) / self._total_weight)

    @property
    def eta_seconds(self) -> float | None:
        etas = [w.eta_seconds for w in self.work if w.eta_seconds is not None]
        return max(etas) if etas else None

    def step_results(self) -> list[dict]:
        """Each step in request order: its status, the images it made, what an answering step said."""
        if self._ended_results is not None:
            return list(self._ended_results)
        with self._lock:
            launched = dict(self.launched)
            ended, paused = self.ended, self.state is RunState.PAUSED
        results = describe_steps(self._in_request_order, launched, ended, paused)
        if ended:
            self._ended_results = results
        return list(results)

    # ---- the run's own progress ---------------------------------------------------------------

    def _live_tasks(self) -> list[DenoiseTask]:
        return [t for w in self.work for t in w.tasks if not t.future.done()]

    def _cpu_in_flight(self) -> bool:
        return any(w.cpu is not None and not w.cpu.done() for w in self.work)

    def _become_paused(self) -> None:
        with self._lock:
            if self.state is not RunState.PAUSING:
                return
            if any(t.state != PARKED for t in self._live_tasks()) or self._cpu_in_flight():
                return
            self._move(RunState.PAUSED)
        self.owner.run_paused(self)

    def _launch_next(self) -> None:
        """Launch the next step (all of them at once in parallel mode), or finish."""
        try:
            with self._lock:
                if self.ended or self.state is RunState.PAUSED:
                    return
                pause_now = self.state is RunState.PAUSING
                if pause_now:
                    self._move(RunState.PAUSED)
                else:
                    steps = self._next_wave()
                    self.work = [StepWork(step) for step in steps]
                    self.launched.update((work.step.order, work) for work in self.work)
                    self.next_step += len(steps)
            if pause_now:
                self.owner.run_paused(self)
                return
            if not self.work:  # every step has ended (perhaps resumed after the last): it ran, and is done
                self.owner.run_running(self)
                self._finish(self.images, None)
                return
        except Exception as error:  # a bug here must still end the run with an envelope
            self._finish([], as_worker_error(error))
            return
        for work in list(self.work):
            try:
                self._launch(work)
            except Exception as error:  # a model that cannot load, an input that cannot be read
                self._settle(work, error=as_worker_error(error))

    def _next_wave(self) -> list[PlannedStep]:
        """The steps to launch together next: one (sequential), or every step of the next wave."""
        steps = self.plan.steps[self.next_step :]
        if not steps or not self.plan.parallel:
            return steps[:1]
        return [step for step in steps if step.wave == steps[0].wave]

    def _launch(self, work: StepWork) -> None:
        step = work.step
        inputs = step.inputs if step.inputs is not None else self.images
        if step.operation.needs_input and not inputs:
            self._settle(work, error=InvalidRequest(f"{step.label} needs an input image and has none"))
            return
        if step.operation.answers is not None:
            self.owner.run_running(self)
            work.cpu = self.cpu.submit(self._answer, work, inputs)
            work.cpu.add_done_callback(lambda future: self._cpu_done(work, future))
            return
        if step.operation.on_device:
            self._launch_on_device(work, inputs)
            return
        self.owner.run_running(self)
        work.cpu = self.cpu.submit(step.operation.run, step.params, inputs)
        work.cpu.add_done_callback(lambda future: self._cpu_done(work, future))

    def _launch_on_device(self, work: StepWork, inputs: list[StepImage]) -> None:
        step = work.step
        model_id = step.params.model or self.plan.model_id
        sizing = step.params.sizing() if isinstance(step.params, BatchProcessParams) else self.sizing
        init_images = inputs if step.operation.uses_images else []
        specs = image_specs(step.params, init_images, model_id, self.native_size(model_id))
        tasks = [DenoiseTask(spec, self.priority, listener=self, sizing=sizing, submitted_at=self.submitted_at,
                             isolated=self.isolated, record_id=self.record_id)
                 for spec in specs]
        refused: WorkerError | None = None
        with self._steering:  # against cancel, pause and resume: each sees these images, or they see it
            with self._lock:
                if self.ended:
                    return  # cancelled while the step was being planned: nothing of it reaches a device
                work.tasks = tasks
                self.all_tasks.extend(tasks)
                pause = self.pause_requested  # a pause that came while the step was being planned
            for task in tasks:
                task.future.add_done_callback(lambda _f, w=work: self._device_done(w))
            try:
                for task in tasks:
                    self.pool.submit(task)
            except WorkerError as error:
                refused = error
                for task in tasks:
                    self.pool.cancel(task)
            for task in tasks if pause and refused is None else ():
                self.pool.pause(task)
        if refused is not None:
            self._settle(work, error=refused)

    def _answer(self, work: StepWork, inputs: list[StepImage]) -> list[StepImage]:
        """An answering step: acts on the device side, keeps its answer; the images pass through it."""
        work.answer = work.step.operation.answers(work.step.params, self.pool)
        return inputs

    def _device_done(self, work: StepWork) -> None:
        """A future's callback, often on the device thread: only the last image of the step hands off."""
        if all(task.future.done() for task in work.tasks):
            try:
                self.cpu.submit(self._device_step_ended, work)
            except RuntimeError:  # the CPU pool is shut down: a close failed the images; settle here
                self._device_step_ended(work)

    def _device_step_ended(self, work: StepWork) -> None:
        self.owner.run_off_device(self)
        errors = [t.future.exception() for t in work.tasks if t.future.cancelled() or t.future.exception()]
        if errors:
            self._settle(work, error=as_worker_error(errors[0]))
        else:
            images = [StepImage(t.future.result(), t.spec.seed, image_metadata(t, self.plan)) for t in work.tasks]
            self._settle(work, images)

    def _cpu_done(self, work: StepWork, future: Future) -> None:
        if future.cancelled():  # a close cancelled it before it ran
            self._settle(work, error=Cancelled("the worker closed before this step ran"))
            return
        error = future.exception()
        if error is None:
            self._settle(work, future.result())
        else:
            self._settle(work, error=as_worker_error(error))

    def _settle(self, work: StepWork, images: list[StepImage] | None = None, error: WorkerError | None = None) -> None:
        """One launched step ended; once all have, fail with every error or go on to the next step."""
        with self._lock:
            if work.settled:
                return
            work.settled, work.finished_at = True, time.time()
            work.results, work.error = (images, None) if error is None else (None, error)
            work.images_made = len(images or ())
            if self.ended or not all(w.settled for w in self.work):
                return
            failures = [(w.step, w.error) for w in self.work if w.error is not None]
            if not failures:
                made = [image for w in self.work for image in w.results]
                # in sequence a step's images replace the ones before; a parallel wave's add to them
                self.images = self.images + made if self.plan.parallel else made
                for w in self.work:
                    w.results = None  # the run holds them now; a finished step keeps only its count
                self.completed_steps += len(self.work)
                self.work = []
            tasks = self._live_tasks() if failures else []
        if failures:
            for task in tasks:
                self.pool.cancel(task)
            self._finish([], aggregate_errors(failures))
            return
        self.owner.run_progress(self)
        self._launch_next()

    def _finish(self, images: list[StepImage], error: WorkerError | None) -> None:
        with self._lock:
            if not self._move(RunState.ENDED):
                return
            self.error = error
        self._tell_finished(images)

    def _tell_finished(self, images: list[StepImage]) -> None:
        """Once per run, right after the move to ENDED."""
        try:
            self.owner.run_finished(self, images, self.error)
        except Exception:
            log.exception("run owner failed to record the end of a run")

    # ---- TaskListener: the device worker's events, told on its event thread, in order -------------

    def task_started(self, task: DenoiseTask) -> None:
        self.owner.run_running(self)

    def task_stepped(self, task: DenoiseTask) -> None:
        self.owner.run_progress(self)

    def task_parked(self, task: DenoiseTask) -> None:
        if all(t.state == PARKED for t in self._live_tasks()):
            self.owner.run_off_device(self)
        self._become_paused()
