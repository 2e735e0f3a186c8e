"""A coordination's `inference.batch_process` step as a real batch, a child of its session, which waits on it.

Design notes
- The step's images are a batch like any other (`BatchService.prepare`,
  then `start_child`): every batch command sees it under the step's
  `batch_id` (given, or generated and reported in the step's result), its
  `batch_config` sizes its forwards and `parallel_processing` adds device
  workers, as for `execute_batch`. Its outputs are the batch's; its items'
  pixels become the step's images.
- It is planned on the CPU pool when the step launches (it may name the
  model a step before it loaded), then joins on the lifecycle loop. The
  session's run hears its items' changes after each message
  (`record_event`, a book listener) and settles the step once every item is
  final: completed, with their images; failed or cancelled (a batch
  command, a delete), with that error.
- The session steers it: a pause, resume or cancel of the session reaches
  every item, and the session is paused once the items are. A restart (or
  the new run of a session recovered after a process restart) deletes the
  batch it made before under that id and makes it again.
"""

from __future__ import annotations

from concurrent.futures import Future
from typing import TYPE_CHECKING

import numpy as np

from ..errors import Cancelled, InternalError, WorkerError
from ..workflows.operations import StepImage
from . import batch_view
from .launched_steps import as_worker_error
from .state import CANCELLED, COMPLETED, WorkState

if TYPE_CHECKING:
    from concurrent.futures import Executor

    from ..outputs.store import OutputStore
    from .batches import BatchService
    from .jobs import Job, JobService
    from .launched_steps import StepWork
    from .loop import LifecycleLoop
    from .run import WorkflowRun
    from .state import Record

_ERRORS = {kind.code: kind for kind in WorkerError.__subclasses__()}  # an error code -> its kind


class ChildBatch:
    """The items of one step's batch, steered by the session's run."""

    def __init__(self, batch_id: str, jobs: list[Job], service: JobService):
        self.batch_id = batch_id
        self.jobs = jobs
        self.service = service

    @property
    def ended(self) -> bool:
        return all(job.record.state.final for job in self.jobs)

    @property
    def parked(self) -> bool:
        """Nothing of it runs: every unfinished item is paused."""
        return all(job.record.state in (WorkState.PAUSED, *_FINAL) for job in self.jobs)

    def pause(self) -> None:
        for job in self.jobs:
            self.service.pause(job)

    def resume(self) -> None:
        for job in self.jobs:
            self.service.resume(job)

    def cancel(self) -> None:
        for job in self.jobs:
            self.service.cancel(job, "its session ended")

    def outcome(self) -> tuple[list[dict], WorkerError | None]:
        """Once every item is final: the items' outputs, or the error the step fails with."""
        records = [job.record for job in self.jobs]
        status = batch_view.status(records)
        if status == COMPLETED:
            return [ref for record in records for ref in record.outputs], None
        error, failed = batch_view.failure(records)
        if status == CANCELLED:
            return [], Cancelled(f"batch '{self.batch_id}' was cancelled" + (f": {error}" if error else ""))
        codes = {detail["error_code"] for detail in failed or ()}
        kind = _ERRORS.get(codes.pop(), InternalError) if len(codes) == 1 else InternalError
        return [], kind(f"batch '{self.batch_id}': {error}", details={"batch_id": self.batch_id, "failed": failed})


_FINAL = tuple(state for state in WorkState if state.final)


class ChildBatches:
    """Starts the steps' batches and passes their items' changes to the runs waiting on them; on the loop."""

    def __init__(self, batches: BatchService, jobs: JobService, cpu: Executor, loop: LifecycleLoop,
                 outputs: OutputStore):
        self.batches = batches
        self.jobs = jobs
        self.cpu = cpu
        self.loop = loop
        self.outputs = outputs
        self._waiting: dict[str, tuple[WorkflowRun, StepWork]] = {}  # item record id -> the run waiting on it

    def start(self, run: WorkflowRun, work: StepWork) -> None:
        """Plan the step's batch on the CPU pool; it joins on the loop (`_join`)."""
        params = work.step.params
        work.answer = {"batch_id": params.batch_id}
        request = params.batch_request(run.priority)
        try:
            work.cpu = self.cpu.submit(self.batches.prepare, params.batch_id, request, run.record_id)
        except RuntimeError:  # the CPU pool is shut down: the worker closed
            run.child_settled(work, error=Cancelled("the worker closed before this step ran"))
            return
        work.cpu.add_done_callback(lambda future: self.loop.post(self._join, run, work, future))

    def _join(self, run: WorkflowRun, work: StepWork, future: Future) -> None:
        if work.settled or run.ended:  # cancelled, paused off, replaced while it was planned
            return
        try:
            prepared = future.result()
            jobs = self.batches.start_child(prepared)
        except Exception as error:  # what the batch path refuses, an id taken meanwhile, a close, a full disk
            run.child_settled(work, error=as_worker_error(error))
            return
        work.child = ChildBatch(prepared.record.id, jobs, self.jobs)
        for job in jobs:
            self._waiting[job.record.id] = (run, work)
        if run.state is WorkState.PAUSING:
            work.child.pause()

    def record_event(self, record: Record, event: str) -> None:
        """A book listener: an item of a step's batch changed (or went); its run hears it."""
        waiting = self._waiting.get(record.id)
        if waiting is None:
            return
        run, work = waiting
        child = work.child
        if not child.ended:
            run.child_moved()
            return
        for job in child.jobs:
            self._waiting.pop(job.record.id, None)
        references, error = child.outcome()
        if error is not None:
            run.child_settled(work, error=error)
            return
        try:
            reading = self.cpu.submit(self._images, references)
        except RuntimeError:
            run.child_settled(work, error=Cancelled("the worker closed before this step ended"))
            return
        reading.add_done_callback(lambda future: self.loop.post(self._read, run, work, future))

    def _images(self, references: list[dict]) -> list[StepImage]:
        """On the CPU pool: the batch's outputs as the step's images."""
        images = []
        for reference in references:
            buffer = self.outputs.get(reference["output_id"])
            # a copy: the batch (its files too) may be deleted while later steps still work on them
            images.append(StepImage(np.array(buffer.pixels), buffer.seed, dict(buffer.metadata)))
        return images

    def _read(self, run: WorkflowRun, work: StepWork, future: Future) -> None:
        try:
            images = future.result()
        except Exception as error:  # a file gone, a close that cancelled the read
            run.child_settled(work, error=as_worker_error(error))
            return
        run.child_settled(work, images)
