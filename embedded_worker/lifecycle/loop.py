"""LifecycleLoop: the one thread that writes work state.

Design notes
- Every change to a record, a job or a run is a message to this loop,
  applied one at a time: callers' requests (execute, control, delete,
  close), the device's events (started, stepped, parked, finished), CPU
  completions (a step computed, files written) and cluster events. Nothing
  else writes work state, so no lock guards it and two controls can never
  interleave halfway (vLLM's scheduler loop, InvokeAI's one transition
  function).
- Change, then emit: after each message the loop hands what it recorded to
  the listeners (`after_each`: the store, then the board and trackers), and
  only then answers the caller that waits on the message (`call`) and the
  waiters whose condition now holds (`wait_for`). A status a caller hears is
  already on disk. Waiters' conditions are about work state, so they are
  looked at only after a message that changed some (most messages are a
  step's progress), and once when they start waiting.
- Readers never wait for the loop: status polls read the fields the loop
  wrote (one attribute read each), so a poll costs what it costs.
- The device threads post their events here (`submit`, the executor shape
  the device pool expects) and never wait, except for the one on-device
  mark that must be on disk before a forward (`call`): the loop itself never
  waits for a device.
"""

from __future__ import annotations

import logging
import queue
import threading
from concurrent.futures import Future, InvalidStateError
from typing import Any, Callable

from ..errors import Unavailable

log = logging.getLogger("embedded_worker.lifecycle")
_STOP = object()


class LifecycleLoop:
    def __init__(self, after_each: Callable[[], bool] = lambda: True):
        self.after_each = after_each  # emits what the message changed (whether it changed any); the loop only
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._waiters: list[tuple[Callable[[], bool], Future]] = []  # the loop thread only
        self._thread = threading.Thread(target=self._serve, name="ew-lifecycle", daemon=True)
        self._ident: int | None = None
        self._changed = False  # the message just applied changed work state; the loop thread only
        self._open = threading.Lock()  # guards `_stopped` against a message put after the stop
        self._stopped = False

    def start(self) -> None:
        self._thread.start()

    @property
    def on_loop(self) -> bool:
        return threading.get_ident() == self._ident

    def require_loop(self) -> None:
        """Work state is written here only: any other writer is a bug, named at once."""
        if threading.get_ident() != self._ident:
            raise RuntimeError("work state is written on the lifecycle loop only, not on "
                               f"{threading.current_thread().name}")

    # ---- messages -------------------------------------------------------------------------------------

    def post(self, fn: Callable, *args: Any) -> None:
        """Apply `fn(*args)` on the loop, after what came before; nobody waits for it. Dropped once stopped."""
        self._put(fn, args, None)

    def submit(self, fn: Callable, *args: Any) -> Future:
        """Like `post`, with a future of its result (completed after its changes were emitted); once stopped,
        a future of Unavailable."""
        future: Future = Future()
        if not self._put(fn, args, future):
            future.set_exception(Unavailable("the worker has closed"))
        return future

    def call(self, fn: Callable, *args: Any) -> Any:
        """`fn(*args)` on the loop, its result or its exception here; at once when already on the loop."""
        if self.on_loop:
            return fn(*args)
        return self.submit(fn, *args).result()

    def wait_for(self, predicate: Callable[[], bool], timeout: float | None = None) -> bool:
        """Block (never on the loop) until `predicate()` holds after some message, or `timeout`; the loop
        checks it after each message's changes were emitted."""
        future: Future = Future()
        if not self._put(self._add_waiter, (predicate, future), None):
            return predicate()
        try:
            return future.result(timeout)
        except TimeoutError:
            future.cancel()  # the loop drops it
            return predicate()

    def stop(self) -> None:
        """What was posted before is applied, then the thread ends; later messages are refused."""
        with self._open:
            if self._stopped:
                return
            self._stopped = True
            self._inbox.put((_STOP, (), None))
        if self._thread.is_alive() and not self.on_loop:
            self._thread.join()

    def _put(self, fn: Callable, args: tuple, future: Future | None) -> bool:
        with self._open:
            if self._stopped:
                return False
            self._inbox.put((fn, args, future))
            return True

    # ---- the loop -------------------------------------------------------------------------------------

    def _add_waiter(self, predicate: Callable[[], bool], future: Future) -> None:
        self._waiters.append((predicate, future))
        self._changed = True  # looked at once now

    def _serve(self) -> None:
        self._ident = threading.get_ident()
        while True:
            fn, args, future = self._inbox.get()
            if fn is _STOP:
                break
            result, failure = None, None
            try:
                result = fn(*args)
            except BaseException as error:  # the caller hears it; the loop goes on
                failure = error
                if future is None:
                    log.exception("lifecycle: %s failed", getattr(fn, "__qualname__", fn))
            try:
                self._changed = self.after_each() or self._changed
            except Exception:
                log.exception("lifecycle: emitting a change failed")
            if future is not None:
                if failure is None:
                    future.set_result(result)
                else:
                    future.set_exception(failure)
            if self._waiters and self._changed:
                self._answer_waiters()
            self._changed = False
        for _, future in self._waiters:
            _answer(future, False)

    def _answer_waiters(self) -> None:
        waiting = []
        for predicate, future in self._waiters:
            if future.cancelled():  # its waiter gave up
                continue
            try:
                held = predicate()
            except Exception as error:
                _answer(future, error=error)
                continue
            if held:
                _answer(future, True)
            else:
                waiting.append((predicate, future))
        self._waiters = waiting


def _answer(future: Future, value: Any = None, error: BaseException | None = None) -> None:
    """A waiter's answer, unless it gave up (cancelled its future) in the meantime."""
    try:
        if error is None:
            future.set_result(value)
        else:
            future.set_exception(error)
    except InvalidStateError:
        pass
