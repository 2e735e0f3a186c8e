"""BatchProgressTracker: follow one batch from Python, with callbacks and an ETA.

    with worker.track_batch(batch_id, on_update=print) as tracker:
        final = tracker.wait()

`on_update` receives the batch's figures (the same as in get_batch_status:
counts, progress 0-100, images_per_second, eta_seconds) after every change,
on the worker's postprocessing threads: keep it quick.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable

from ..lifecycle.state import FINAL

log = logging.getLogger("embedded_worker.batches")


class BatchProgressTracker:
    def __init__(self, feed, batch_id: str, on_update: Callable[[dict], None] | None = None):
        self.batch_id = batch_id
        self._on_update = on_update
        self._lock = threading.Lock()  # guards `_latest`
        self._latest: dict | None = None
        self._final = threading.Event()
        self._stop = feed.observe(batch_id, self._update)

    def _update(self, figures: dict) -> None:
        with self._lock:
            self._latest = figures
        if self._on_update is not None:
            try:
                self._on_update(figures)
            except Exception:
                log.exception("a batch progress callback failed")
        if figures["status"] in FINAL:
            self._final.set()

    def snapshot(self) -> dict | None:
        with self._lock:
            return dict(self._latest) if self._latest is not None else None

    def wait(self, timeout: float | None = None) -> dict | None:
        """The final figures, or the latest ones when `timeout` passes first."""
        self._final.wait(timeout)
        return self.snapshot()

    def close(self) -> None:
        self._stop()

    def __enter__(self) -> "BatchProgressTracker":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
