"""Retention: finished sessions and batches are kept up to a count and an age, then deleted with their files.

A listener of the StateBook: when a session or batch finishes, a prune runs
on the CPU pool, at most every PRUNE_INTERVAL_SECONDS (or at once when the
count is exceeded). A prune deletes the oldest finished ones beyond
`max_finished` and any finished longer ago than `max_age_hours`, through
the services' own delete, so their outputs and files go too.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Executor

from . import batch_view
from .batches import BatchService
from .config import Retention as RetentionLimits
from .errors import NotFound
from .protocol import DeleteBatchRequest, DeleteSessionRequest, parse
from .sessions import SessionService
from .state import FINAL, Record, StateBook

log = logging.getLogger("embedded_worker")
PRUNE_INTERVAL_SECONDS = 60.0


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
        self._pruning = threading.Lock()  # one prune at a time

    def record_event(self, record: Record, event: str) -> None:
        """After a session or batch finishes: prune on the CPU pool, at most every PRUNE_INTERVAL."""
        if record.kind == "item" or record.status not in FINAL or self.closing.is_set():
            return
        now = time.monotonic()
        if now - self._pruned_at >= PRUNE_INTERVAL_SECONDS or \
                len(self.book.sessions) + len(self.book.batches) > self.config.max_finished:
            self._pruned_at = now
            self.cpu.submit(self.prune)

    def prune(self) -> int:
        """Delete the oldest finished sessions and batches beyond the count or past the age; their files too."""
        with self._pruning:
            return self._prune()

    def _prune(self) -> int:
        with self.book.lock:
            candidates = [*self.book.sessions.values(), *self.book.batches.values()]
        finished = sorted((r for r in candidates if self._is_final(r)), key=self._completed_at)
        cutoff = time.time() - self.config.max_age_hours * 3600
        excess = max(0, len(finished) - self.config.max_finished)
        victims = [r for i, r in enumerate(finished) if i < excess or self._completed_at(r) < cutoff]
        for record in victims:
            try:
                if record.kind == "session":
                    self.sessions.delete(parse(DeleteSessionRequest, {"session_id": record.id}))
                else:
                    self.batches.delete(parse(DeleteBatchRequest, {"batch_id": record.id}))
            except NotFound:
                pass  # the caller deleted it meanwhile
        if victims:
            log.info("retention: pruned %d finished sessions and batches", len(victims))
        return len(victims)

    def _is_final(self, record: Record) -> bool:
        if record.kind == "batch":
            return batch_view.status(self.batches.items(record)) in FINAL
        return record.status in FINAL

    def _completed_at(self, record: Record) -> float:
        if record.kind == "batch":
            return batch_view.completed_at(self.batches.items(record)) or 0.0
        return record.completed_at or 0.0
