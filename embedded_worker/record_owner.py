"""RecordOwner: what a run's events mean for the record it works for.

A session and a batch item are both "a record with a run": the run reports
that it is running, has progressed, paused or finished, and this class turns
each report into a state transition (through the StateBook, the only place a
status changes), progress fields and registered outputs. Events from an
earlier attempt (before a restart) are recognised and ignored.
"""

from __future__ import annotations

import logging
from typing import Callable

from .errors import WorkerError
from .operations import StepImage
from .outputs import OutputStore
from .runner import WorkflowRun
from .state import CANCELLED, COMPLETED, FAILED, PAUSED, RUNNING, Record, StateBook

log = logging.getLogger("embedded_worker.records")


class RecordOwner:
    def __init__(
        self,
        book: StateBook,
        outputs: OutputStore,
        record: Record,
        owner_id: str,
        on_progress: Callable[[Record, WorkflowRun], None] | None = None,
    ):
        self.book = book
        self.outputs = outputs
        self.record = record
        self.owner_id = owner_id  # whose outputs these are: the session, or the item's batch
        self.on_progress = on_progress or (lambda record, run: None)  # each denoising step: keep it cheap
        self.attempt = record.attempt

    def _current(self) -> bool:
        return self.record.attempt == self.attempt

    def run_running(self, run: WorkflowRun) -> None:
        if self._current():
            self.book.transition(self.record, RUNNING)  # refused unless pending: the state machine decides

    def run_on_device(self, run: WorkflowRun, on_device: bool) -> None:
        """Stored, so that after a crash the next start knows whose images were on the device."""
        if self._current() and self.record.on_device != on_device:
            self.record.on_device = on_device
            self.book.save(self.record)

    def run_progress(self, run: WorkflowRun) -> None:
        """Progress lives in the run (status replies read it there); the owner only passes it on."""
        if self._current():
            self.on_progress(self.record, run)

    def run_paused(self, run: WorkflowRun) -> None:
        if self._current():
            self.book.transition(self.record, PAUSED)

    def run_finished(self, run: WorkflowRun, images: list[StepImage], error: WorkerError | None) -> None:
        if not self._current():
            return
        record = self.record
        if error is None:
            item_id = getattr(record, "item_id", None)
            try:
                record.outputs = [self._keep(image, run) for image in images]
            except Exception as failure:  # an unwritable folder fails the work; nothing claims success
                log.error("%s: outputs could not be written: %s", record.label(), failure)
                self.outputs.release(self.owner_id, item_id=item_id)
                self.book.transition(record, FAILED, f"outputs could not be written: {failure}",
                                     {"error_code": "internal"})
                return
            if not self.book.transition(record, COMPLETED):
                # deleted, cancelled or suspended while its files were written: they belong to nobody
                self.outputs.release(self.owner_id, item_id=item_id)
                record.outputs = []
                return
            log.info("%s completed with %d output(s)", record.label(), len(record.outputs))
        else:
            if error.code == "cancelled":
                self.book.transition(record, CANCELLED)
            else:
                details = {"error_code": error.code, "details": error.details}
                self.book.transition(record, FAILED, error.message, details)
                log.warning("%s failed (%s): %s", record.label(), error.code, error.message)

    def _keep(self, image: StepImage, run: WorkflowRun) -> dict:
        buffer = self.outputs.add(self.owner_id, image.pixels, item_id=getattr(self.record, "item_id", None),
                                  seed=image.seed, metadata=image.metadata, image_format=run.plan.file_format,
                                  quality=run.plan.file_quality)
        return buffer.reference()
