"""ProgressFeed: the progress board and batch trackers follow the book and the runs.

A listener of the StateBook and of every job's denoising steps, both on the
lifecycle loop: it hears each change after the message that made it, in
order, and keeps its own maps without a lock. A session's row is
published on each of its changes and steps; a batch's row, derived from its
items (`batch_view`), on each item change and at most every
BOARD_INTERVAL_SECONDS of steps, and its trackers get the same figures on
the CPU pool. The batch's stored status is refreshed here too, so the state
file says what the view says.
"""

from __future__ import annotations

import time
from concurrent.futures import Executor
from typing import TYPE_CHECKING, Callable

from ..lifecycle import batch_view
from ..lifecycle.state import ADDED, COMPLETED, FINAL, REMOVED, SessionRecord
from .board import state_code

if TYPE_CHECKING:
    from ..lifecycle.batches import BatchService
    from ..lifecycle.jobs import Job, JobService
    from ..lifecycle.state import BatchRecord, Record, StateBook
    from .board import ProgressBoard

BOARD_INTERVAL_SECONDS = 0.05


class ProgressFeed:
    def __init__(self, board: ProgressBoard, book: StateBook, jobs: JobService, batches: BatchService,
                 cpu: Executor):
        self.board = board
        self.book = book
        self.loop = book.loop
        self.jobs = jobs
        self.batches = batches
        self.cpu = cpu
        self._published: dict[str, float] = {}  # batch id -> when its row was last published for a step
        self._observers: dict[str, list[Callable[[dict], None]]] = {}

    # ---- what happens -----------------------------------------------------------------------------

    def record_event(self, record: Record, event: str) -> None:
        """The book's listener: slots claimed and released, rows published."""
        if record.kind == "item":
            batch = self.book.batches.get(record.batch_id)
            if batch is not None:
                self._batch_changed(batch)
            return
        if event == ADDED:
            record.board_slot = self.board.claim(record.kind, record.id)
        elif event == REMOVED:
            self.board.release(record.id)
            self._published.pop(record.id, None)
            self._observers.pop(record.id, None)
            return
        if isinstance(record, SessionRecord):
            self._publish_session(record)
        else:
            self._publish_batch(record)

    def progress(self, job: Job) -> None:
        """A job's run made a step: its session's row, or (at most every BOARD_INTERVAL) its batch's."""
        record = job.record
        if isinstance(record, SessionRecord):
            self._publish_session(record)
            return
        now = time.monotonic()
        if now - self._published.get(record.batch_id, 0.0) < BOARD_INTERVAL_SECONDS:
            return
        self._published[record.batch_id] = now
        batch = self.book.batches.get(record.batch_id)
        if batch is not None:
            self._publish_batch(batch)

    def observe(self, batch_id: str, observer: Callable[[dict], None]) -> Callable[[], None]:
        """Call `observer(figures)` after every change of the batch; returns the way to stop."""
        record = self.batches.record(batch_id)
        self.loop.call(self._observers.setdefault(batch_id, []).append, observer)

        def stop() -> None:
            self.loop.post(self._forget, batch_id, observer)

        self.cpu.submit(observer, self.batches.figures(record))
        return stop

    def _forget(self, batch_id: str, observer: Callable[[dict], None]) -> None:
        if observer in self._observers.get(batch_id, []):
            self._observers[batch_id].remove(observer)

    # ---- publishing -------------------------------------------------------------------------------

    def _batch_changed(self, batch: BatchRecord) -> None:
        items = self.batches.items(batch)
        status = batch_view.status(items)
        if status != batch.status:  # the stored row follows the view; this update comes back as the batch's
            batch.status, batch.started_at, batch.completed_at = \
                status, batch_view.started_at(items), batch_view.completed_at(items)
            self.book.update(batch)
        else:
            self._publish_batch(batch, items)

    def _publish_session(self, record: SessionRecord) -> None:
        if record.board_slot < 0:
            return
        values = {"state": state_code(record.status), "total_steps": record.total_steps, "attempt": record.attempt}
        run = self.jobs.run_of(record.id)
        if run is not None:
            tasks = [t for w in run.work for t in w.tasks]
            eta = run.eta_seconds
            values.update(
                progress_bp=10000 if record.status == COMPLETED else int(run.progress * 10000),
                current_step=run.current_step,
                denoise_step=max((t.step for t in tasks), default=0),
                denoise_total=max((t.total_steps for t in tasks), default=0),
                items_done=len(record.outputs),
                eta_ms=0 if record.status in FINAL else (-1 if eta is None else int(eta * 1000)),
            )
        self.board.publish(record.board_slot, values)

    def _publish_batch(self, record: BatchRecord, items=None) -> None:
        """The batch's figures to the board and to every tracker of it."""
        figures = self.batches.figures(record, items)
        if record.board_slot >= 0:
            self.board.publish(record.board_slot, {
                "state": state_code(figures["status"]),
                "progress_bp": int(100 * figures["progress"]),
                "items_done": figures["processed_items"],
                "items_failed": figures["failed_items"],
                "items_total": figures["total_items"],
                "eta_ms": -1 if figures["eta_seconds"] is None else int(1000 * figures["eta_seconds"]),
                "attempt": record.attempt,
            })
        # on the CPU pool: a slow callback must not hold up anyone
        for observer in list(self._observers.get(record.id, ())):
            self.cpu.submit(observer, dict(figures))
