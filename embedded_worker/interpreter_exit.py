"""Closing, at interpreter exit, every worker the host left open.

Design notes
- A device thread is a daemon: at finalization the interpreter ends it
  wherever it is, and inside torch's C++ frames that is an abort
  ("terminate called without an active exception", SIGABRT). A host that
  never called `close()`, or whose `close()` was refused for a bad
  argument, used to die that way whenever a step was under way at exit.
  So every open worker is listed here, and one hook closes each as a plain
  `close()` would (unfinished work suspended, kept for the next start),
  with a bounded wait; a host that closed its workers finds the list empty.
- The hook is one of threading's exit hooks, not `atexit`'s: those run
  after threading's shutdown, when concurrent.futures has already joined
  its pools and refuses new work, and a close still needs the worker's
  event and CPU pools. threading runs its hooks newest first, so this
  one, registered after concurrent.futures', runs before the pools stop.
"""

from __future__ import annotations

import concurrent.futures.thread  # noqa: F401  its exit hook first, so ours is registered after it and runs before
import logging
import threading
from typing import Protocol


class ProcessingWorker(Protocol):
    """What the exit needs of a `facade.ProcessingWorker` (named so, without importing the facade)."""

    def close(self, timeout: float = ..., pending: str = ...) -> dict: ...

log = logging.getLogger("embedded_worker")
EXIT_CLOSE_SECONDS = 10.0  # how long the exit waits for the device threads' step boundary, before close's grace

# id -> worker, in the order they opened; guarded by _lock. Held strongly: an open worker's threads run on
# whether or not the host still holds it, so it must still be closed at exit
_open: dict[int, ProcessingWorker] = {}
_lock = threading.Lock()
_hooked = False  # guarded by _lock


def opened(worker: ProcessingWorker) -> None:
    """`worker` is open until `closed(worker)`: the interpreter's exit closes it if the host does not."""
    global _hooked
    with _lock:
        if not _hooked:
            threading._register_atexit(_close_open_workers)
            _hooked = True
        _open[id(worker)] = worker


def closed(worker: ProcessingWorker) -> None:
    with _lock:
        _open.pop(id(worker), None)


def _close_open_workers() -> None:
    """Newest first, as exit hooks go; each close is bounded; one that fails never stops the others."""
    with _lock:
        workers = list(_open.values())[::-1]
    if workers:
        log.warning("the interpreter is exiting with %d worker(s) open; closing them (unfinished work suspended)",
                    len(workers))
    for worker in workers:
        try:
            worker.close(timeout=EXIT_CLOSE_SECONDS, pending="suspend")
        except Exception:
            log.exception("closing a worker at interpreter exit failed")
