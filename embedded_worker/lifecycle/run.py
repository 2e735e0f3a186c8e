"""WorkflowRun: how far one execution of a RunPlan has got, step after step, for one job.

Design notes
- No thread per run, and no lock: every method runs on the lifecycle loop
  (`lifecycle_loop`). A run launches a step's work (images on the
  DevicePool, or a function on the CPU pool) and continues when that work
  reports back; the device's events and the CPU pool's completions arrive
  as messages to the loop, so a cancel, a pause and a launch can never
  interleave: a launch after a cancel is not a race to win, it simply does
  not happen (the run is no longer its job's current run).
- The run has no state of its own: where it is (pending, pausing, paused,
  ended) is its job's record state (`state.WorkState`); the run is told by
  its job (`jobs.Job`) and tells it what happened (`running`, `progressed`,
  `parked`, `off_device`, `done`, `failed`).
- A step launches once the steps it waits for (PlannedStep.after) have
  completed: in sequence the step before it, on whose images it works; in
  parallel nothing, or the model steps that name its model. So a parallel
  step never waits for work it does not depend on. After a failure nothing
  new launches, and once nothing is in flight the run fails with every
  error.
- Answering steps (model load/unload, device status) run on the CPU pool:
  their answer is kept as the step's result, the images pass through.
- A batch_process step makes a batch of its own, a child of the session
  (`child_batch`); the run steers it with the session and takes its images.
- Pause: images on the device park at the next step boundary (their state is
  kept); a CPU step finishes, then the run waits before the next step.
  Resume continues exactly there (after a restart, from each image's
  checkpoint: `checkpoints`). Cancel ends it at once; images still on the
  device stop at their next step boundary and skip the VAE decode.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Executor, Future
from typing import TYPE_CHECKING, Callable, Protocol

from ..diffusion.task import PARKED, DenoiseTask
from ..errors import Cancelled, InvalidRequest, WorkerError
from ..workflows.operations import StepImage, image_specs
from .launched_steps import StepWork, aggregate_errors, as_worker_error, describe_steps, image_metadata
from .state import WorkState

if TYPE_CHECKING:
    from ..diffusion.device_pool import DevicePool
    from ..diffusion.task import BatchSizing
    from .checkpoints import Checkpoints
    from .loop import LifecycleLoop
    from .planning import PlannedStep, RunPlan
    from .state import Record

log = logging.getLogger("embedded_worker.runner")


class JobView(Protocol):
    """What a run reads of its job (`jobs.Job`: the record, which run is current) and tells it."""

    record: Record
    run: "WorkflowRun | None"

    def running(self, run: "WorkflowRun") -> None: ...

    def progressed(self, run: "WorkflowRun") -> None: ...

    def parked(self, run: "WorkflowRun") -> None: ...

    def off_device(self, run: "WorkflowRun") -> None: ...

    def failed(self, run: "WorkflowRun", error: WorkerError) -> None: ...

    def done(self, run: "WorkflowRun", images: list[StepImage]) -> None: ...


class BatchSteps(Protocol):
    """Makes a batch_process step's batch (`child_batch.ChildBatches`); it tells the run `child_settled`."""

    def start(self, run: "WorkflowRun", work: StepWork) -> None: ...


class WorkflowRun:
    def __init__(
        self,
        plan: RunPlan,
        job: JobView,
        pool: DevicePool,
        cpu: Executor,
        loop: LifecycleLoop,
        native_size: Callable[[str], tuple[int, int]],
        children: BatchSteps | None,
        checkpoints: Checkpoints,
        *,
        sizing: BatchSizing | None = None,
        isolated: bool = False,
    ):
        self.plan = plan
        self.job = job
        self.pool = pool
        self.cpu = cpu
        self.loop = loop
        self.native_size = native_size  # model id -> (width, height) it was trained at
        self.children = children  # makes a batch_process step's batch
        self.checkpoints = checkpoints  # where its images' states are kept, and continue from after a restart
        self.record_id = job.record.id  # whose images these are: named in the store while they are on a device
        self.priority = job.record.priority
        self.sizing = sizing
        self.isolated = isolated
        self.submitted_at = time.monotonic()  # its images queue in the order their requests came
        self.error: WorkerError | None = None  # how it ended, when it failed
        self.images: list[StepImage] = []  # in sequence: what the last completed step made
        self.work: list[StepWork] = []  # the steps in flight (replaced, never mutated: status polls read it)
        self.launched: dict[int, StepWork] = {}  # PlannedStep.order -> its work, for step results
        self.all_tasks: list[DenoiseTask] = []  # every image this run sent to a device, for metrics
        self.completed_steps = 0
        self._completed_weight = 0  # the progress shares (PlannedStep.weight) of the completed steps
        self._in_request_order = sorted(plan.steps, key=lambda s: s.order)
        self._ended_results: list[dict] | None = None  # step_results once the run ended: polled, never changing
        self._total_weight = max(1, sum(step.weight for step in plan.steps))
        self._advancing = False  # launching ready steps now: a step that settles meanwhile is seen by that loop

    @property
    def state(self) -> WorkState:
        """Its job's record state while it is the job's current run; CANCELLED once replaced."""
        return self.job.record.state if self.job.run is self else WorkState.CANCELLED

    @property
    def ended(self) -> bool:
        """Nothing more to launch: final, or finishing (its outputs being written)."""
        state = self.state
        return state.final or state is WorkState.FINISHING

    # ---- what its job tells it, on the loop ------------------------------------------------------

    def start(self, paused: bool = False) -> None:
        """Begin with the steps that wait for nothing, or (paused) wait before them until `resume`."""
        if not paused:
            self._advance()

    def pause(self) -> None:
        """The record is PAUSING: every image parks at its next step boundary; `parked` follows once all are."""
        for task in self._live_tasks():
            self.pool.pause(task)
        for child in self._children():
            child.pause()
        self._parked_if_all()

    def resume(self) -> None:
        """The record is pending again: parked images go back to the queue, the steps now ready begin."""
        for task in self._live_tasks():
            self.pool.resume(task)
        for child in self._children():
            child.resume()
        self._advance()

    def cancel(self) -> None:
        """Ended (cancelled, deleted or replaced): images still out stop at their next step boundary."""
        for task in self._live_tasks():
            self.pool.cancel(task)
        for child in self._children():
            child.cancel()

    # ---- a batch_process step's batch, on the loop ------------------------------------------------

    def child_moved(self) -> None:
        """An item of a step's batch changed: a pausing session may now be paused."""
        self._parked_if_all()

    def child_settled(self, work: StepWork, images: list[StepImage] | None = None,
                      error: WorkerError | None = None) -> None:
        self._settle(work, images, error)

    # ---- progress, read by status calls from any thread -----------------------------------------

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
        waiting = next((s for s in self.plan.steps if s.order not in self.launched), self.plan.steps[-1])
        return waiting.label

    @property
    def substep_progress(self) -> float:
        work = self.work
        return sum(w.fraction for w in work) / len(work) if work else 0.0

    @property
    def progress(self) -> float:
        """0..1 over all steps, each weighted (PlannedStep.weight), counting the denoising inside."""
        if self.state in (WorkState.FINISHING, WorkState.COMPLETED):
            return 1.0
        work = self.work
        running = sum(w.step.weight * w.fraction for w in work) if work else 0.0
        return min(1.0, (self._completed_weight + running) / self._total_weight)

    @property
    def eta_seconds(self) -> float | None:
        etas = [w.eta_seconds for w in self.work if w.eta_seconds is not None]
        return max(etas) if etas else None

    def step_results(self) -> list[dict]:
        """Each step in request order: its status, the images it made, what an answering step said."""
        if self._ended_results is not None:
            return list(self._ended_results)
        ended = self.ended
        results = describe_steps(self._in_request_order, dict(self.launched), ended, self.state is WorkState.PAUSED)
        if ended:
            self._ended_results = results
        return list(results)

    # ---- the run's own progress, on the loop ------------------------------------------------------

    def _live_tasks(self) -> list[DenoiseTask]:
        return [t for w in self.work for t in w.tasks if not t.future.done()]

    def _children(self) -> list:
        return [w.child for w in self.work if w.child is not None]

    def _parked_if_all(self) -> None:
        """Pausing, with every image parked, every step's batch paused and no CPU step under way: paused."""
        cpu_busy = any(w.cpu is not None and not w.cpu.done() for w in self.work)
        if self.state is WorkState.PAUSING and not cpu_busy and \
                all(t.state == PARKED for t in self._live_tasks()) and all(c.parked for c in self._children()):
            self.job.parked(self)

    def _advance(self) -> None:
        """Launch every step whose dependencies completed; once nothing is in flight, fail with every error
        or finish. Nothing launches while pausing (it parks once nothing runs) or after the run ended."""
        if self._advancing:
            return  # a step settled while it was launched: the launching loop below sees it
        self._advancing = True
        try:
            while self.state in (WorkState.PENDING, WorkState.RUNNING) and not self._failures() and \
                    self._launch_ready():
                pass
        finally:
            self._advancing = False
        state = self.state
        if state is WorkState.PAUSING:
            self._parked_if_all()
        if state not in (WorkState.PENDING, WorkState.RUNNING) or self.work:
            return
        failures = self._failures()
        if failures:
            self.error = aggregate_errors(failures)
            self.job.failed(self, self.error)
        elif len(self.launched) == len(self.plan.steps):  # every step completed (perhaps resumed after the last)
            self.job.done(self, self._made_images())

    def _launch_ready(self) -> bool:
        """Launch the steps whose dependencies completed, in request order (all of them, so that steps ready
        together that fail at once are all named); False if none."""
        launched = self.launched
        ready = [step for step in self._in_request_order if step.order not in launched and
                 all(order in launched and launched[order].completed for order in step.after)]
        for step in ready:
            work = StepWork(step)
            launched[step.order] = work
            self.work = [*self.work, work]
            try:
                self._launch(work)
            except Exception as error:  # a model that cannot load, an input that cannot be read
                self._settle(work, error=as_worker_error(error))
        return bool(ready)

    def _failures(self) -> list[tuple[PlannedStep, WorkerError]]:
        return [(w.step, w.error) for w in map(self.launched.get, sorted(self.launched)) if w.error is not None]

    def _made_images(self) -> list[StepImage]:
        """The run's images: in sequence the last step's, in parallel every step's, in request order."""
        if not self.plan.parallel:
            return self.images
        made = [image for order in sorted(self.launched) for image in self.launched[order].results or ()]
        for work in self.launched.values():
            work.results = None  # the job holds them now; a finished step keeps only its count
        return made

    def _launch(self, work: StepWork) -> None:
        step = work.step
        inputs = step.inputs if step.inputs is not None else self.images
        if step.operation.needs_input and not inputs:
            self._settle(work, error=InvalidRequest(f"{step.label} needs an input image and has none"))
            return
        if step.operation.answers is not None:
            self.job.running(self)
            self._on_cpu(work, self._answer, work, inputs)
            return
        if step.operation.makes_batch:
            self.job.running(self)
            self.children.start(self, work)
            return
        if step.operation.on_device:
            self._launch_on_device(work, inputs)
            return
        self.job.running(self)
        self._on_cpu(work, step.operation.run, step.params, inputs)

    def _on_cpu(self, work: StepWork, fn: Callable, *args) -> None:
        """`fn(*args)` on the CPU pool; its end comes back to the loop."""
        try:
            work.cpu = self.cpu.submit(fn, *args)
        except RuntimeError:  # the CPU pool is shut down: the worker closed
            self._settle(work, error=Cancelled("the worker closed before this step ran"))
            return
        work.cpu.add_done_callback(lambda future: self.loop.post(self._cpu_done, work, future))

    def _launch_on_device(self, work: StepWork, inputs: list[StepImage]) -> None:
        step = work.step
        model_id = step.params.model or self.plan.model_id
        init_images = inputs if step.operation.uses_images else []
        specs = image_specs(step.params, init_images, model_id, self.native_size(model_id))
        tasks = [DenoiseTask(spec, self.priority, listener=self, sizing=self.sizing, submitted_at=self.submitted_at,
                             isolated=self.isolated, record_id=self.record_id)
                 for spec in specs]
        self.checkpoints.name_images(self.record_id, step.order, tasks)
        work.tasks = tasks
        self.all_tasks.extend(tasks)
        for task in tasks:
            task.future.add_done_callback(lambda _f, w=work: self._device_done(w))
        try:
            for task in tasks:
                self.pool.submit(task)
        except WorkerError as error:
            for task in tasks:
                self.pool.cancel(task)
            self._settle(work, error=error)
            return

    def _answer(self, work: StepWork, inputs: list[StepImage]) -> list[StepImage]:
        """An answering step: acts on the device side, keeps its answer; the images pass through it."""
        work.answer = work.step.operation.answers(work.step.params, self.pool)
        return inputs

    def _device_done(self, work: StepWork) -> None:
        """A future's callback, often on a device thread: the last image of the step tells the loop."""
        if all(task.future.done() for task in work.tasks):
            self.loop.post(self._device_step_ended, work)

    def _device_step_ended(self, work: StepWork) -> None:
        if work.settled:
            return  # two device threads both saw the step end
        self.job.off_device(self)
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
        """One launched step ended: what it made is kept (in sequence, for the step after it), then the run
        goes on with what is now ready."""
        if work.settled:
            return
        work.settled, work.finished_at = True, time.time()
        work.results, work.error = (images, None) if error is None else (None, error)
        work.images_made = len(images or ())
        self.work = [w for w in self.work if w is not work]
        if self.ended:
            return
        if error is None:
            self.completed_steps += 1
            self._completed_weight += work.step.weight
            if not self.plan.parallel:  # in sequence a step's images replace the ones before
                self.images, work.results = images, None
            self.job.progressed(self)
        self._advance()

    # ---- TaskListener: the device's events, posted to the loop in order -----------------------------

    def task_started(self, task: DenoiseTask) -> None:
        self.job.running(self)

    def task_stepped(self, task: DenoiseTask) -> None:
        self.job.progressed(self)

    def task_parked(self, task: DenoiseTask) -> None:
        if all(t.state == PARKED for t in self._live_tasks()):
            self.job.off_device(self)
        self._parked_if_all()
