"""Retention: finished sessions and batches are kept up to a count and an age, then deleted with their files.

A listener of the StateBook: when a session or batch finishes, a prune is
asked for, at most every PRUNE_INTERVAL_SECONDS (or at once when the count
is exceeded). A prune deletes the oldest finished ones beyond
`max_finished` and any finished longer ago than `max_age_hours`, through
the services' own delete, so their outputs and files go too.

Design notes
- Pruning shares the CPU pool with every run's continuations, so it is one
  coalesced job: at most one pass is queued or running; asking while one
  runs makes it look again when done. Each deletion is a final event that
  asks again, which once queued a prune per event (57,937 at a start on
  30k finished rows, a 1-step session then took 15.7 s).
- A pass deletes at most PRUNE_CHUNK records, then goes to the back of the
  pool's queue while more remain: live work queued meanwhile runs first,
  and a start on 100k rows does one chunk before it accepts work. The
  restore's own events ask for nothing: `start` looks once, after it.
- Victims are chosen once (one sort of every record) and deleted over the
  passes that follow; each is checked again just before its delete, so one
  restarted meanwhile is left alone.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from concurrent.futures import Executor
from typing import TYPE_CHECKING

from ..api.messages import DeleteBatchRequest, DeleteSessionRequest, parse
from ..errors import NotFound
from . import batch_view
from .state import FINAL

if TYPE_CHECKING:
    from ..config import Retention as RetentionLimits
    from .batches import BatchService
    from .sessions import SessionService
    from .state import Record, StateBook

log = logging.getLogger("embedded_worker")
PRUNE_INTERVAL_SECONDS = 60.0
PRUNE_CHUNK = 100  # deletions per pass: what a continuation queued behind a pass waits for at most


class Retention:
    def __init__(self, config: RetentionLimits, book: StateBook, sessions: SessionService, batches: BatchService,
                 cpu: Executor, closing: threading.Event):
        self.config = config
        self.book = book
        self.sessions = sessions
        self.batches = batches
        self.cpu = cpu
        self.closing = closing  # no prunes once the worker closes
        self._pruned_at = 0.0
        self._pruning = threading.Lock()  # one pass at a time; guards `_victims`
        self._victims: deque[tuple[Record, float]] = deque()  # chosen, oldest first, not yet deleted
        self._job = threading.Lock()  # guards the two flags below
        self._scheduled = False  # a pass is queued or running on the CPU pool
        self._again = False  # asked for while a pass was scheduled: look again after it
        self._started = False  # until `start`, events are the restore's: `start` looks at them all at once

    def record_event(self, record: Record, event: str) -> None:
        """After a session or batch finishes: ask for a prune, at most every PRUNE_INTERVAL."""
        if record.kind == "item" or record.status not in FINAL or self.closing.is_set() or not self._started:
            return
        now = time.monotonic()
        if now - self._pruned_at >= PRUNE_INTERVAL_SECONDS or \
                len(self.book.sessions) + len(self.book.batches) > self.config.max_finished:
            self._pruned_at = now
            self.schedule()

    def start(self) -> None:
        """After the restore: one pass now (a few aged records are gone before the first request), the rest on
        the pool."""
        self._started = True
        if self.prune_some():
            self.schedule()

    def schedule(self) -> None:
        """A pass on the CPU pool, unless one is queued or running already (then it looks again when done)."""
        with self._job:
            if self._scheduled:
                self._again = True
                return
            self._scheduled = True
        self._submit()

    def _submit(self) -> None:
        try:
            self.cpu.submit(self._pass)
        except RuntimeError:  # the pool has shut down: the worker closed
            with self._job:
                self._scheduled = False

    def _pass(self) -> None:
        try:
            more = self.prune_some()
        except Exception:  # a failed pass must not end pruning for good
            log.exception("retention: a prune pass failed")
            more = False
        with self._job:
            again, self._again = self._again, False
            if self.closing.is_set() or not (more or again):
                self._scheduled = False
                return
        self._submit()  # behind whatever live work was queued meanwhile

    def prune_some(self) -> bool:
        """Delete up to PRUNE_CHUNK of the chosen victims (choosing anew when none are left); True while
        chosen ones remain."""
        with self._pruning:
            if not self._victims:
                self._victims = deque(self._choose())
            deleted = 0
            for _ in range(min(PRUNE_CHUNK, len(self._victims))):
                if self.closing.is_set():
                    break
                record, completed_at = self._victims.popleft()
                if self._still_victim(record, completed_at):
                    deleted += self._delete(record)
            if deleted:
                log.info("retention: pruned %d finished sessions and batches (%d more chosen)", deleted,
                         len(self._victims))
            return bool(self._victims)

    def _choose(self) -> list[tuple[Record, float]]:
        """The oldest finished sessions and batches beyond the count, and any past the age; oldest first."""
        candidates = [*list(self.book.sessions.values()), *list(self.book.batches.values())]
        finished = sorted(((r, self._completed_at(r)) for r in candidates if self._is_final(r)),
                          key=lambda chosen: chosen[1])
        cutoff = time.time() - self.config.max_age_hours * 3600
        excess = max(0, len(finished) - self.config.max_finished)
        return [(r, at) for i, (r, at) in enumerate(finished) if i < excess or at < cutoff]

    def _still_victim(self, record: Record, completed_at: float) -> bool:
        """Still stored, still final, and not finished again since it was chosen (restarted meanwhile)."""
        table = self.book.sessions if record.kind == "session" else self.book.batches
        return table.get(record.id) is record and self._is_final(record) and \
            self._completed_at(record) == completed_at

    def _delete(self, record: Record) -> int:
        try:
            if record.kind == "session":
                self.sessions.delete(parse(DeleteSessionRequest, {"session_id": record.id}))
            else:
                self.batches.delete(parse(DeleteBatchRequest, {"batch_id": record.id}))
            return 1
        except NotFound:
            return 0  # the caller deleted it meanwhile

    def _is_final(self, record: Record) -> bool:
        if record.kind == "batch":
            return batch_view.status(self.batches.items(record)) in FINAL
        return record.status in FINAL

    def _completed_at(self, record: Record) -> float:
        if record.kind == "batch":
            return batch_view.completed_at(self.batches.items(record)) or 0.0
        return record.completed_at or 0.0
