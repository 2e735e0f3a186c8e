"""LogBridge: the worker's log records, queued for the host to drain.

A .NET host has no Python console. The worker's records (logger
`embedded_worker` and below) go into a bounded queue that the host drains
when it likes; when nobody drains, the oldest records are dropped and
counted, so memory stays bounded and the loss is visible.
"""

from __future__ import annotations

import collections
import logging
import threading

from .api.messages import iso

MAX_MESSAGE_CHARS = 8000  # a record's text, traceback included; the rest is cut and marked


class LogBridge(logging.Handler):
    """Records are turned into small dicts when they are emitted, so a queued record keeps no request,
    argument or traceback frame alive while it waits for the host."""

    def __init__(self, capacity: int, level: int = logging.INFO):
        super().__init__(level)
        self._records: collections.deque[dict] = collections.deque(maxlen=capacity)
        self._guard = threading.Lock()  # guards the deque and `dropped` together
        self.dropped = 0

    def emit(self, record: logging.LogRecord) -> None:
        try:
            described = self._describe(record)
        except Exception:
            self.handleError(record)
            return
        with self._guard:
            if len(self._records) == self._records.maxlen:
                self.dropped += 1
            self._records.append(described)

    def drain(self, limit: int) -> tuple[list[dict], int]:
        """Up to `limit` records, oldest first, and how many were dropped so far."""
        with self._guard:
            taken = [self._records.popleft() for _ in range(min(limit, len(self._records)))]
            dropped = self.dropped
        return taken, dropped

    @staticmethod
    def _describe(record: logging.LogRecord) -> dict:
        message = record.getMessage()
        if record.exc_info:
            message += "\n" + logging.Formatter().formatException(record.exc_info)
        if len(message) > MAX_MESSAGE_CHARS:
            message = message[:MAX_MESSAGE_CHARS] + f" ... [{len(message) - MAX_MESSAGE_CHARS} characters cut]"
        return {"time": iso(record.created), "level": record.levelname, "logger": record.name,
                "thread": record.threadName, "message": message}
