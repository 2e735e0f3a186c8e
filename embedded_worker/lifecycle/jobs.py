"""JobService: one lifecycle for every unit of work, a record with a run, all of it on the lifecycle loop.

Design notes
- A job is a record (a session, or one item of a batch) and the
  WorkflowRun doing its work. Sessions and batch items are the same kind of
  job: created pending, controlled (pause, resume, cancel, restart),
  deleted, cancelled at close and recovered at a start, all here; the only
  difference is whose outputs they are (`owner_id`: the session, or the
  item's batch). This is the only place a WorkflowRun is built.
- Every method runs on the lifecycle loop (`lifecycle_loop`), the one
  thread that writes work state: the services call in with `loop.call`, the
  runs and the device's events are already there. So a control decides and
  acts in one message: nothing can happen between "is it running" and
  "pause it".
- The run tells its job what happened (`running`, `progressed`, `parked`,
  `off_device`, `done`, `failed`) and the job moves the record's one state
  (`state.WorkState`). A run the job has replaced (a restart) is no longer
  current: what it tells is ignored, and its images are cancelled.
- A session that ends keeps its run's step results on its record, so the
  stored row carries them and a next start still shows them.
- Outputs are written on the CPU pool while the record is FINISHING; the
  record completes when they are written, unless a cancel, delete or
  restart came first (then they are discarded, by id).
- `mark_on_device` comes from a device thread, which waits for it: the
  images starting are on disk as on the device before any work on them, so
  a crash in what follows names them (and no longer the records whose images
  left the device before them).
"""

from __future__ import annotations

import logging
from concurrent.futures import Executor, Future
from typing import TYPE_CHECKING, Callable

from ..diffusion.task import PARKED
from ..errors import InvalidState
from .recovery_decisions import FAIL, KEEP_PAUSED, QUARANTINE
from .run import BatchSteps, WorkflowRun
from .state import CREATED, FINAL, SessionRecord, WorkState

if TYPE_CHECKING:
    from ..diffusion.device_pool import DevicePool
    from ..diffusion.task import BatchSizing, DenoiseTask
    from ..errors import WorkerError
    from ..outputs.store import OutputBuffer, OutputStore
    from ..workflows.operations import StepImage
    from .checkpoints import Checkpoints
    from .loop import LifecycleLoop
    from .planning import RunPlan
    from .recovery_decisions import Decision
    from .state import Record, StateBook
    from .store import StateStore

log = logging.getLogger("embedded_worker.jobs")
S = WorkState


class Job:
    """A record and the run doing its work; what the run tells becomes the record's state."""

    def __init__(self, service: "JobService", record: Record, plan: RunPlan, sizing: BatchSizing | None):
        self.service = service
        self.record = record
        self.plan = plan
        self.sizing = sizing  # a batch item's share of the forwards its batch asked for
        self.run: WorkflowRun | None = None  # the current attempt's; None until it begins

    @property
    def owner_id(self) -> str:
        """Whose outputs these are: the session, or the item's batch."""
        return getattr(self.record, "batch_id", None) or self.record.id

    @property
    def item_id(self) -> str | None:
        return getattr(self.record, "item_id", None)

    def begin(self, paused: bool = False, isolated: bool = False) -> None:
        """A new run for the current attempt, started (or waiting paused before its first step); the old
        run, if any, is cancelled. None for a record already ended (its run would compute for nobody)."""
        if self.record.state.final:
            return
        service = self.service
        old, self.run = self.run, WorkflowRun(self.plan, self, service.pool, service.cpu, service.loop,
                                              service.native_size, service.children, service.checkpoints,
                                              sizing=self.sizing, isolated=isolated)
        if old is not None:
            old.cancel()
        self.run.start(paused=paused)

    # ---- what the current run tells ------------------------------------------------------------

    def _move(self, run: WorkflowRun, target: WorkState, error: str | None = None, details: dict | None = None) \
            -> bool:
        if run is not self.run or not self.service.book.transition(self.record, target, error, details):
            return False
        if target.final:
            self.keep_step_results()
        return True

    def keep_step_results(self) -> None:
        """On the record of a session that ended (stored with the change that ended it)."""
        if isinstance(self.record, SessionRecord) and self.run is not None:
            self.record.step_results = self.run.step_results()

    def running(self, run: WorkflowRun) -> None:
        """Its work started (an image on a device, a CPU step): pending -> running; a pausing record only
        notes that it started."""
        if run is not self.run:
            return
        if self.record.state is S.PENDING:
            self.service.book.transition(self.record, S.RUNNING)
        elif self.record.state is S.PAUSING:
            self.service.book.note_started(self.record)

    def progressed(self, run: WorkflowRun) -> None:
        if run is self.run:
            self.service.on_progress(self)

    def parked(self, run: WorkflowRun) -> None:
        self._move(run, S.PAUSED)

    def off_device(self, run: WorkflowRun) -> None:
        """Its images left the device: a crash from now on is not theirs (stored like the on-device mark, also
        once a suspending close froze the book: a next start must not blame it for a close)."""
        if run is self.run and self.record.on_device:
            self.service._mark_on_device([], {self.record.id})

    def failed(self, run: WorkflowRun, error: WorkerError) -> None:
        if error.code == "cancelled":
            self._move(run, S.CANCELLED)
        elif self._move(run, S.FAILED, error.message, {"error_code": error.code, "details": error.details}):
            log.warning("%s failed (%s): %s", self.record.label(), error.code, error.message)

    def done(self, run: WorkflowRun, images: list[StepImage]) -> None:
        """Every step ended: the outputs are written on the CPU pool, then the record completes."""
        if run is not self.run:
            return
        if self.record.state is S.PENDING:  # resumed after its last step: nothing else said it ran
            self.service.book.transition(self.record, S.RUNNING)
        if not self._move(run, S.FINISHING):
            return
        try:
            written = self.service.cpu.submit(self._write, images)
        except RuntimeError:  # the CPU pool is shut down: the worker closed
            self._move(run, S.FAILED, "the worker closed before the outputs were written",
                       {"error_code": "unavailable"})
            return
        written.add_done_callback(lambda future: self.service.loop.post(self._written, run, future))

    def _write(self, images: list[StepImage]) -> list[OutputBuffer]:
        """On the CPU pool: every output kept, or none (what was written is discarded, the error raised)."""
        outputs, kept = self.service.outputs, []
        try:
            for image in images:
                kept.append(outputs.add(self.owner_id, image.pixels, item_id=self.item_id, seed=image.seed,
                                        metadata=image.metadata, image_format=self.plan.file_format,
                                        quality=self.plan.file_quality))
        except BaseException:
            outputs.discard(kept)
            raise
        return kept

    def _written(self, run: WorkflowRun, future: Future) -> None:
        """On the loop: the outputs are the record's, unless it was cancelled, deleted, restarted or suspended
        while they were written (then they belong to nobody)."""
        record, outputs = self.record, self.service.outputs
        failure = future.exception()
        if failure is not None:  # an unwritable folder fails the work; nothing claims success
            log.error("%s: outputs could not be written: %s", record.label(), failure)
            self._move(run, S.FAILED, f"outputs could not be written: {failure}", {"error_code": "internal"})
            return
        kept = future.result()
        if run is not self.run or record.state is not S.FINISHING or self.service.book.frozen:
            outputs.discard(kept)
            return
        record.outputs = [buffer.reference() for buffer in kept]
        self._move(run, S.COMPLETED)
        log.info("%s completed with %d output(s)", record.label(), len(record.outputs))


class JobService:
    """Every method on the lifecycle loop (`loop`), except `mark_on_device`, which a device thread calls."""

    def __init__(self, book: StateBook, loop: LifecycleLoop, pool: DevicePool, cpu: Executor, outputs: OutputStore,
                 store: StateStore, native_size: Callable[[str], tuple[int, int]], on_progress: Callable[[Job], None],
                 checkpoints: Checkpoints):
        self.book = book
        self.loop = loop
        self.pool = pool
        self.cpu = cpu
        self.outputs = outputs
        self.store = store
        self.native_size = native_size
        self.on_progress = on_progress  # each denoising step of a job: keep it cheap
        self.checkpoints = checkpoints  # images' denoise states, kept while their records are unfinished
        self._jobs: dict[str, Job] = {}  # record id -> its job; written on the loop, read anywhere
        self.children: BatchSteps | None = None  # makes batch_process steps' batches (set by the engine)

    # ---- creating ----------------------------------------------------------------------------

    def admit(self, record: Record, plan: RunPlan, sizing: BatchSizing | None = None) -> Job:
        """A new record joins the book with its job, pending; `launch` it once its batch is complete."""
        job = Job(self, record, plan, sizing)
        self.book.add(record)
        self._jobs[record.id] = job
        self.book.transition(record, S.PENDING)
        return job

    @staticmethod
    def launch(jobs: list[Job]) -> None:
        for job in jobs:
            job.begin()

    def job(self, record_id: str) -> Job | None:
        return self._jobs.get(record_id)

    def run_of(self, record_id: str) -> WorkflowRun | None:
        job = self._jobs.get(record_id)  # a dict read: status polls take no lock
        return job.run if job is not None else None

    def open_count(self) -> int:
        """Unfinished sessions and items: what the queue limit counts."""
        return sum(1 for job in self._jobs.values() if job.record.status not in FINAL)

    # ---- controls: each True when it took effect -----------------------------------------------

    def pause(self, job: Job) -> bool:
        """Images park at their next step boundary; the record is `paused` once all have (at once when
        nothing of it is out). Finishing: nothing left to pause, it completes."""
        state = job.record.state
        if state is S.FINISHING:
            return True
        if state not in (S.PENDING, S.RUNNING) or job.run is None:
            return False
        self.book.transition(job.record, S.PAUSING)
        job.run.pause()
        return True

    def resume(self, job: Job) -> bool:
        """Paused: pending again, and on. Pausing: the pause is called off."""
        record = job.record
        if job.run is None or record.state not in (S.PAUSED, S.PAUSING):
            return False
        target = S.RUNNING if record.state is S.PAUSING and record.started_at is not None else S.PENDING
        self.book.transition(record, target)
        job.run.resume()
        return True

    def cancel(self, job: Job, reason: str | None = None) -> bool:
        if not self.book.transition(job.record, S.CANCELLED, reason):
            return False
        job.keep_step_results()
        if job.run is not None:
            job.run.cancel()
        return True

    def restart(self, job: Job, plan: RunPlan | None = None) -> None:
        """A new attempt of the same request, its earlier outputs released; InvalidState when completed.
        `plan`: the request planned again, for a job restored from the store without one."""
        job.plan = plan or job.plan
        if job.plan is None:
            raise InvalidState(f"{job.record.label()} cannot restart: its request was not planned")
        self.book.begin_attempt(job.record)
        job.record.outputs = []
        if isinstance(job.record, SessionRecord):
            job.record.step_results = []
        self.outputs.release(job.owner_id, item_id=job.item_id)
        self.checkpoints.forget(job.record.id)  # a restart starts over: nothing continues from the last attempt
        job.begin()  # the old run is cancelled: what it still tells is ignored, its outputs discarded

    def delete(self, owner_id: str, jobs: list[Job], delete_files: bool) -> list[dict]:
        """Cancel what is unfinished, release the owner's outputs (before the records go: a record that is
        gone has no files left), forget the records; the released outputs."""
        for job in jobs:
            self.book.transition(job.record, S.CANCELLED)
            if job.run is not None:
                job.run.cancel()
        released = self.outputs.release(owner_id, delete_files=delete_files)
        for job in jobs:
            self.book.remove(job.record)
            self._jobs.pop(job.record.id, None)
            job.run = None  # whatever its run still tells is ignored
        return released

    def parked_images(self) -> list[DenoiseTask]:
        """Every paused image: what a suspending close checkpoints (its cohort, or its state in host memory)."""
        return [task for job in self._jobs.values() if job.run is not None
                for task in job.run.all_tasks if task.state == PARKED]

    def cancel_all(self, reason: str) -> None:
        for job in list(self._jobs.values()):
            if job.record.status not in FINAL:
                self.cancel(job, reason)

    # ---- recovery -------------------------------------------------------------------------------

    def recover(self, record: Record, plan: RunPlan | None, decision: Decision,
                sizing: BatchSizing | None = None) -> None:
        """Apply a recovery decision to a stored unfinished record already in the book."""
        record.recoveries, record.restarts, record.on_device = decision.recoveries, decision.restarts, False
        job = Job(self, record, plan, sizing)
        self._jobs[record.id] = job
        if decision.action in (FAIL, QUARANTINE):
            self.book.transition(record, S.FAILED, decision.reason, {"error_code": decision.error_code})
            return
        if decision.action == KEEP_PAUSED:
            self.book.update(record)
        elif record.status == CREATED:
            self.book.transition(record, S.PENDING)
        else:
            self.book.begin_attempt(record)  # it had begun: a new attempt, from pending
        job.begin(paused=decision.action == KEEP_PAUSED, isolated=decision.isolated)

    def adopt(self, record: Record) -> None:
        """A stored final record: listed and answered, nothing to run (planned again if restarted)."""
        self._jobs[record.id] = Job(self, record, None, None)

    # ---- the device's one wait -------------------------------------------------------------------

    def mark_on_device(self, tasks: list[DenoiseTask], left: set[str] = frozenset()) -> None:
        """From a device thread, which waits: images start on a device, so their records are stored as on
        it, and the records in `left` (whose images left the device since) as off it, in one write."""
        self.loop.call(self._mark_on_device, tasks, left)

    def _mark_on_device(self, tasks: list[DenoiseTask], left: set[str]) -> None:
        on = {task.record_id for task in tasks if task.record_id is not None}
        changed: dict[str, bool] = {}
        for record_id, flag in [*((r, False) for r in left - on), *((r, True) for r in on)]:
            job = self._jobs.get(record_id) if record_id is not None else None
            if job is not None and job.record.on_device != flag:
                job.record.on_device = flag  # in memory first: a full save from now on carries it too
                changed[record_id] = flag
        if changed:
            self.store.mark_on_device([r for r, flag in changed.items() if flag],
                                      [r for r, flag in changed.items() if not flag])
