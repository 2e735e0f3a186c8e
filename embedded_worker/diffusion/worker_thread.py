"""WorkerThread: a device worker's named thread, and the calls other threads ask it to run between steps.

What a worker drives (a pipeline, or a remote worker's actor handle) belongs
to its thread: model loads and unloads asked for by other threads queue
here (`call`) and run on that thread between two steps (`_run_calls`).
`stop` asks the loop to end; calls still queued then are refused. The
queue's condition guards both, so a call and the loop's wait never race.
"""

from __future__ import annotations

import threading
from collections import deque
from concurrent.futures import Future
from typing import TYPE_CHECKING, Callable

from ..errors import Unavailable

if TYPE_CHECKING:
    from .work_queue import WorkQueue


class WorkerThread:
    def __init__(self, name: str, queue: WorkQueue):
        self.name = name
        self.queue = queue
        self._calls: deque[tuple[Callable, Future]] = deque()  # guarded by queue.cond
        self._stopping = False  # guarded by queue.cond
        self.suspending = False  # set by a suspending close: the images in flight leave their state behind
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)

    def _run(self) -> None:
        raise NotImplementedError  # the worker's loop

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        with self.queue.cond:
            self._stopping = True
            self.queue.cond.notify_all()

    def call(self, fn: Callable) -> Future:
        """Run `fn(worker)` on this worker's thread between two steps."""
        future: Future = Future()
        with self.queue.cond:
            if self._stopping:
                future.set_exception(Unavailable("the worker is closing"))
                return future
            self._calls.append((fn, future))
            self.queue.cond.notify_all()
        return future

    def _run_calls(self) -> None:
        with self.queue.cond:
            calls = list(self._calls)
            self._calls.clear()
        for fn, future in calls:
            try:
                future.set_result(fn(self))
            except BaseException as error:  # handed to the caller, who turns it into an envelope
                future.set_exception(error)

    def _refuse_calls(self) -> None:
        """At the end of the loop: whatever is still asked for is refused."""
        with self.queue.cond:
            calls = list(self._calls)
            self._calls.clear()
        for _, future in calls:
            future.set_exception(Unavailable("the worker is closing"))
