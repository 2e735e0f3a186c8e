"""JobService: one lifecycle for every unit of work, a record with a run.

Design notes
- A job is a record (a session, or one item of a batch) and the
  WorkflowRun doing its work. Sessions and batch items are the same kind of
  job: created pending, controlled (pause, resume, cancel, restart),
  deleted, cancelled at close and recovered at a start, all here; the only
  difference is whose outputs they are (`owner_id`: the session, or the
  item's batch). This is the only place a WorkflowRun is built.
- The run reports to its job (`run_running`, `run_progress`, ...), and the
  job turns each report into a status change through the StateBook, the
  only place a status changes. A report from a run the job has replaced
  (a restart) is ignored.
- Dependencies come in narrowly: the book, the device pool, the CPU pool,
  the output store and the model sizes; `on_progress` hears each step.
- `mark_on_device` runs on a device thread when images start: the one
  write the device makes, so that a crash in what follows names them (and
  no longer the records whose images left the device before them).
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Executor
from typing import Callable

from .diffusion.device_pool import DevicePool
from .diffusion.task import BatchSizing, DenoiseTask
from .errors import InvalidState, WorkerError
from .operations import StepImage
from .outputs import OutputBuffer, OutputStore
from .planning import RunPlan
from .recovery import FAIL, KEEP_PAUSED, QUARANTINE, Decision
from .runner import WorkflowRun
from .state import CANCELLED, COMPLETED, CREATED, FAILED, FINAL, PAUSED, PENDING, RUNNING, Record, StateBook
from .store import StateStore

log = logging.getLogger("embedded_worker.jobs")


class Job:
    """A record and the run doing its work; the run's reports become the record's status."""

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

    def new_run(self, isolated: bool = False) -> WorkflowRun:
        service = self.service
        return WorkflowRun(self.plan, self, service.pool, service.cpu, service.native_size,
                           record_id=self.record.id, priority=self.record.priority, sizing=self.sizing,
                           isolated=isolated)

    def begin(self, paused: bool = False, isolated: bool = False) -> None:
        """A new run for the current attempt, started (or waiting paused before its first step); none for a
        record a cancel or delete already ended (its run would compute images for nobody)."""
        run = self.new_run(isolated)
        with self.service.book.lock:  # against `JobService.cancel`: it sees this run, or this sees its status
            if self.record.status in FINAL:
                return
            old, self.run = self.run, run
        if old is not None:
            old.cancel()  # its reports are ignored from now on
        run.start(paused=paused)

    # ---- RunOwner: what the run reports; each change checks, under the book's lock, that the run is current ----

    def _move_if_current(self, run: WorkflowRun, target: str, error: str | None = None,
                         details: dict | None = None) -> bool:
        """The record's move for `run`'s report, taken only while `run` is its current run (checked with the
        move, under the book's lock: a restart cannot come in between)."""
        with self.service.book.locked():
            return run is self.run and self.service.book.transition(self.record, target, error, details)

    def run_running(self, run: WorkflowRun) -> None:
        self._move_if_current(run, RUNNING)  # refused unless pending: the state machine decides

    def run_off_device(self, run: WorkflowRun) -> None:
        """Its images left the device: a crash from now on is not theirs."""
        with self.service.book.locked():
            if run is self.run and self.record.on_device:
                self.record.on_device = False
                self.service.book.update(self.record)

    def run_progress(self, run: WorkflowRun) -> None:
        if run is self.run:
            self.service.on_progress(self)

    def run_paused(self, run: WorkflowRun) -> None:
        self._move_if_current(run, PAUSED)

    def run_finished(self, run: WorkflowRun, images: list[StepImage], error: WorkerError | None) -> None:
        if run is not self.run:
            return
        record, book = self.record, self.service.book
        if error is not None:
            if error.code == "cancelled":
                self._move_if_current(run, CANCELLED)
            elif self._move_if_current(run, FAILED, error.message, {"error_code": error.code,
                                                                     "details": error.details}):
                log.warning("%s failed (%s): %s", record.label(), error.code, error.message)
            return
        outputs = self.service.outputs
        kept: list[OutputBuffer] = []
        try:
            for image in images:
                kept.append(self._keep(image))
        except Exception as failure:  # an unwritable folder fails the work; nothing claims success
            log.error("%s: outputs could not be written: %s", record.label(), failure)
            outputs.discard(kept)
            self._move_if_current(run, FAILED, f"outputs could not be written: {failure}", {"error_code": "internal"})
            return
        with book.locked():  # a cancel, delete or restart in between wins, whole
            completed = run is self.run
            if completed:
                record.outputs = [buffer.reference() for buffer in kept]
                completed = book.transition(record, COMPLETED)
                if not completed:
                    record.outputs = []
        if not completed:
            # replaced, deleted, cancelled or suspended while its files were written: they belong to nobody
            outputs.discard(kept)
            return
        log.info("%s completed with %d output(s)", record.label(), len(record.outputs))

    def _keep(self, image: StepImage) -> OutputBuffer:
        return self.service.outputs.add(self.owner_id, image.pixels, item_id=self.item_id, seed=image.seed,
                                        metadata=image.metadata, image_format=self.plan.file_format,
                                        quality=self.plan.file_quality)


class JobService:
    def __init__(self, book: StateBook, pool: DevicePool, cpu: Executor, outputs: OutputStore, store: StateStore,
                 native_size: Callable[[str], tuple[int, int]], on_progress: Callable[[Job], None]):
        self.book = book
        self.pool = pool
        self.cpu = cpu
        self.outputs = outputs
        self.store = store
        self.native_size = native_size
        self.on_progress = on_progress  # each denoising step of a job: keep it cheap
        self._jobs: dict[str, Job] = {}  # record id -> its job; guarded by book.lock
        # one control or delete at a time: a delete never meets a restart halfway
        self.control_lock = threading.RLock()

    # ---- creating ----------------------------------------------------------------------------

    def admit(self, record: Record, plan: RunPlan, sizing: BatchSizing | None = None) -> Job:
        """A new record joins the book with its job, pending. Call inside `book.locked()`, after the checks
        that must hold with it (capacity, free ids); `launch` the jobs once the lock is released."""
        job = Job(self, record, plan, sizing)
        self.book.add(record)
        self._jobs[record.id] = job
        self.book.transition(record, PENDING)
        return job

    @staticmethod
    def launch(jobs: list[Job]) -> None:
        for job in jobs:
            job.begin()

    def job(self, record_id: str) -> Job | None:
        with self.book.lock:
            return self._jobs.get(record_id)

    def run_of(self, record_id: str) -> WorkflowRun | None:
        job = self._jobs.get(record_id)  # a dict read: status polls take no lock here
        return job.run if job is not None else None

    def open_count(self) -> int:
        """Unfinished sessions and items: what the queue limit counts. Call with the book's lock held."""
        return sum(1 for job in self._jobs.values() if job.record.status not in FINAL)

    # ---- controls: each True when it took effect -----------------------------------------------

    def pause(self, job: Job) -> bool:
        """Images park at their next step boundary; the record is `paused` once all have."""
        if job.record.status not in (PENDING, RUNNING) or job.run is None:
            return False
        job.run.pause()
        return True

    def resume(self, job: Job) -> bool:
        if job.run is None or not self.book.transition(job.record, PENDING):
            return False
        job.run.resume()
        return True

    def cancel(self, job: Job, reason: str | None = None) -> bool:
        with self.book.locked():  # against `Job.begin`: this sees its run, or it sees the cancel
            if not self.book.transition(job.record, CANCELLED, reason):
                return False
            run = job.run
        if run is not None:
            run.cancel()
        return True

    def restart(self, job: Job, plan: RunPlan | None = None) -> None:
        """A new attempt of the same request, its earlier outputs released; InvalidState when completed.
        `plan`: the request planned again, for a job restored from the store without one."""
        job.plan = plan or job.plan
        if job.plan is None:
            raise InvalidState(f"{job.record.label()} cannot restart: its request was not planned")
        run = job.new_run()
        with self.book.locked():  # the new attempt and its run together: the old run is never current again
            self.book.begin_attempt(job.record)
            job.record.outputs = []
            old, job.run = job.run, run
        if old is not None:
            old.cancel()  # outputs it is still writing are discarded when it reports its end
        self.outputs.release(job.owner_id, item_id=job.item_id)
        run.start()

    def delete(self, owner_id: str, jobs: list[Job], delete_files: bool) -> list[dict]:
        """Cancel what is unfinished, release the owner's outputs (before the records go: a record that is
        gone has no files left), forget the records; the released outputs."""
        for job in jobs:
            if job.record.status not in FINAL:
                self.book.transition(job.record, CANCELLED)
            if job.run is not None:
                job.run.cancel()
        released = self.outputs.release(owner_id, delete_files=delete_files)
        with self.book.locked():
            for job in jobs:
                self.book.remove(job.record)
                self._jobs.pop(job.record.id, None)
        return released

    def cancel_all(self, reason: str) -> None:
        with self.book.lock:
            jobs = list(self._jobs.values())
        for job in jobs:
            if job.record.status not in FINAL:
                self.cancel(job, reason)

    # ---- recovery -------------------------------------------------------------------------------

    def recover(self, record: Record, plan: RunPlan | None, decision: Decision,
                sizing: BatchSizing | None = None) -> None:
        """Apply a recovery decision to a stored unfinished record already in the book."""
        record.recoveries, record.restarts, record.on_device = decision.recoveries, decision.restarts, False
        job = Job(self, record, plan, sizing)
        with self.book.locked():
            self._jobs[record.id] = job
            if decision.action in (FAIL, QUARANTINE):
                self.book.transition(record, FAILED, decision.reason, {"error_code": decision.error_code})
                return
            if decision.action == KEEP_PAUSED:
                self.book.update(record)
            elif record.status == CREATED:
                self.book.transition(record, PENDING)
            else:
                self.book.begin_attempt(record)  # it had begun: a new attempt, from pending
        job.begin(paused=decision.action == KEEP_PAUSED, isolated=decision.isolated)

    def adopt(self, record: Record) -> None:
        """A stored final record: listed and answered, nothing to run (planned again if restarted)."""
        with self.book.lock:
            self._jobs[record.id] = Job(self, record, None, None)

    # ---- the device thread's one write --------------------------------------------------------------

    def mark_on_device(self, tasks: list[DenoiseTask], left: set[str] = frozenset()) -> None:
        """Images start on a device: their records are stored as on it, and the records in `left` (whose
        images left the device since) as off it, in one write."""
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
