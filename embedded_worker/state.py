"""Session, batch and item records, and the one place their status changes.

Design notes
- The protocol's seven statuses are the same for sessions and batch items
  (a batch's status is derived from its items: `batch_view`). `transition`
  is the only writer of `status`: it checks the move against `_LEGAL` and
  stamps the times, under the book's lock.
- Events leave the lock before anyone hears them (an outbox): a change is
  recorded under the lock, and once the outermost lock of the changing
  thread is released, that thread dispatches every recorded event, in order,
  to the listeners (the store first, then the board and the batches), one
  dispatcher at a time. A listener may read the book and change it again;
  it never runs inside the lock, so nothing re-enters a half-made change.
  `transition` returns after its event was dispatched: a status is on disk
  before the thread that changed it goes on, and `wait_final` answers a
  waiting caller only once the events of the records it waits on were heard
  (stored, published).
- `completed`, `failed` and `cancelled` are final: nothing the engine does
  moves them. The one exit is an explicit restart of a failed or cancelled
  record, which starts a new attempt (counted in `attempt`). A completed
  record is never re-run: its outputs are the answer.
- Progress (step, substep, ETA) is not kept here: it lives in the run doing
  the work, and status replies read it there.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from .errors import InvalidRequest, InvalidState

CREATED = "created"
PENDING = "pending"
RUNNING = "running"
PAUSED = "paused"
COMPLETED = "completed"
FAILED = "failed"
CANCELLED = "cancelled"

ALL_STATUSES = (CREATED, PENDING, RUNNING, PAUSED, COMPLETED, FAILED, CANCELLED)
FINAL = frozenset({COMPLETED, FAILED, CANCELLED})

_LEGAL: dict[str, frozenset[str]] = {
    CREATED: frozenset({PENDING, CANCELLED, FAILED}),
    PENDING: frozenset({RUNNING, PAUSED, CANCELLED, FAILED}),
    RUNNING: frozenset({PAUSED, COMPLETED, FAILED, CANCELLED}),
    PAUSED: frozenset({PENDING, CANCELLED, FAILED}),
    COMPLETED: frozenset(),
    FAILED: frozenset(),
    CANCELLED: frozenset(),
}
RESTARTABLE = frozenset({PENDING, RUNNING, PAUSED, FAILED, CANCELLED})


def is_legal(current: str, target: str) -> bool:
    return target in _LEGAL[current]


def status_counts(statuses: list[str]) -> dict:
    """How many are in each status, and in all: what get_status reports for sessions and for batches."""
    return {status: statuses.count(status) for status in set(statuses)} | {"total": len(statuses)}


@dataclass(eq=False)
class Record:
    """What every tracked unit of work has: identity, status and its times."""

    id: str
    priority: int = 5
    status: str = CREATED
    attempt: int = 1
    created_at: float = field(default_factory=time.time)
    queued_at: float | None = None
    started_at: float | None = None
    completed_at: float | None = None
    error: str | None = None
    error_details: Any = None
    on_device: bool = False  # its images are on a device now (stored: a crash then names it a suspect)
    recoveries: int = 0  # starts that found it on a device: the process died under it that often
    restarts: int = 0  # starts that found it unfinished, for whatever reason

    kind = "record"

    def label(self) -> str:
        return f"{self.kind.capitalize()} '{self.id}'"


@dataclass(eq=False)
class SessionRecord(Record):
    workflow_id: str | None = None
    request: dict = field(default_factory=dict)
    total_steps: int = 0
    outputs: list[dict] = field(default_factory=list)
    board_slot: int = -1

    kind = "session"


@dataclass(eq=False)
class ItemRecord(Record):
    batch_id: str = ""
    item_id: str = ""  # the caller's id; `id` is "<batch_id>/<item_id>", unique across batches
    index: int = 0
    parameters: dict = field(default_factory=dict)
    seed: int | None = None
    outputs: list[dict] = field(default_factory=list)

    kind = "item"

    def label(self) -> str:
        return f"Item '{self.item_id}' of batch '{self.batch_id}'"


@dataclass(eq=False)
class BatchRecord(Record):
    """A batch's identity and request; its status is its items' (`batch_view`), kept here as last derived
    so the stored row says it too."""

    workflow_id: str = ""
    name: str = ""
    request: dict = field(default_factory=dict)
    configuration: dict = field(default_factory=dict)
    parallel: dict = field(default_factory=dict)  # device workers asked for and what memory allowed
    item_ids: list[str] = field(default_factory=list)
    board_slot: int = -1

    kind = "batch"


ADDED, CHANGED, REMOVED = "added", "changed", "removed"
Listener = Callable[[Record, str], None]


class StateBook:
    """Owns every record; every status change goes through `transition`; events leave after the lock."""

    def __init__(self, listeners: list[Listener] | None = None):
        self.listeners: list[Listener] = list(listeners or [])  # called after the lock, in this order
        # guards the three maps and every status change, so a check-then-move is atomic
        self.lock = threading.RLock()
        self.changed = threading.Condition(self.lock)  # notified after every status change
        self.frozen = False  # set by a suspending close: statuses stay as last stored, for the next start
        self.sessions: dict[str, SessionRecord] = {}
        self.batches: dict[str, BatchRecord] = {}
        self.items: dict[str, ItemRecord] = {}
        self._outbox: deque[tuple[Record, str]] = deque()  # appended under `lock`, drained after it
        self._unheard: Counter[str] = Counter()  # record id -> its events not yet dispatched; under `lock`
        self._dispatching = threading.Lock()  # one dispatcher at a time, so listeners hear events in order
        self._local = threading.local()  # per thread: how deep in `locked()`, and whether dispatching

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """The book's lock; when this thread's outermost hold ends, the events recorded meanwhile go out."""
        local = self._local
        with self.lock:
            local.depth = getattr(local, "depth", 0) + 1
            try:
                yield
            finally:
                local.depth -= 1
        if local.depth == 0:
            self.dispatch()

    def dispatch(self) -> None:
        """Hand every recorded event to the listeners, in order; a listener's own changes follow theirs."""
        local = self._local
        if getattr(local, "dispatching", False) or getattr(local, "depth", 0):
            return  # the loop below (or the outermost `locked`) sends them
        local.dispatching = True
        failure: BaseException | None = None
        try:
            with self._dispatching:
                while self._outbox:
                    record, event = self._outbox.popleft()
                    for listener in self.listeners:
                        try:
                            listener(record, event)
                        except Exception as error:  # the others still hear it; the changer hears of it
                            failure = failure or error
                    with self.lock:
                        self._unheard[record.id] -= 1
                        if not self._unheard[record.id]:
                            del self._unheard[record.id]
                        self.changed.notify_all()
        finally:
            local.dispatching = False
        if failure is not None:
            raise failure  # a listener failed (a bug: the store keeps what the disk refuses): its maker says so

    def _record(self, record: Record, event: str) -> None:
        """Call with the lock held."""
        self._unheard[record.id] += 1
        self._outbox.append((record, event))

    def add(self, record: Record) -> None:
        with self.locked():
            self._table(record)[record.id] = record
            self._record(record, ADDED)

    def require_free_id(self, record: Record, more_ids: list[str] = ()) -> None:
        """Sessions, batches and items share one namespace of ids (one row each in the store, one owner
        of outputs and board slots): a new record whose id (or whose items' ids) another kind of record
        already has is refused."""
        with self.lock:
            for record_id in (record.id, *more_ids):
                for table in (self.sessions, self.batches, self.items):
                    other = table.get(record_id)
                    if other is not None:
                        field = f"{record.kind}_id"
                        raise InvalidRequest(f"{field}: '{record_id}' is already the id of {other.label()}",
                                             details={"field": field, "taken_by": other.kind})

    def remove(self, record: Record) -> None:
        with self.locked():
            if self._table(record).pop(record.id, None) is not None:
                self._record(record, REMOVED)

    def update(self, record: Record) -> None:
        """Fields other than the status changed (outputs, attempt, the device mark): stored and published
        like a status change; nothing once frozen."""
        with self.locked():
            if not self.frozen:
                self._record(record, CHANGED)

    def transition(self, record: Record, target: str, error: str | None = None, details: Any = None) -> bool:
        """Move `record` to `target`; False (and no change) when the move is illegal."""
        with self.locked():
            if self.frozen or not is_legal(record.status, target):
                return False
            now = time.time()
            record.status = target
            if target == PENDING and record.queued_at is None:
                record.queued_at = now
            if target == RUNNING and record.started_at is None:
                record.started_at = now
            if target in FINAL:
                record.completed_at = now
                if error is not None:
                    record.error = error
                    record.error_details = details
            self._record(record, CHANGED)
            self.changed.notify_all()
            return True

    def require(self, record: Record, target: str, verb: str) -> None:
        """Like `transition`, but an illegal move is the caller's error."""
        if not self.transition(record, target):
            raise InvalidState(f"{record.label()} cannot {verb} in current status: {record.status}")

    def begin_attempt(self, record: Record) -> None:
        """Restart: a new attempt of the same request, from `pending`."""
        with self.locked():
            if record.status not in RESTARTABLE:
                raise InvalidState(f"{record.label()} cannot restart in current status: {record.status}")
            record.attempt += 1
            record.status = PENDING
            record.queued_at = time.time()
            record.started_at = record.completed_at = None
            record.error = record.error_details = None
            self._record(record, CHANGED)
            self.changed.notify_all()

    def session_statuses(self) -> list[str]:
        with self.lock:
            return [r.status for r in self.sessions.values()]

    def wait_until(self, predicate: Callable[[], bool], timeout: float | None) -> bool:
        """Block until `predicate()` holds after some status change, or `timeout` passes."""
        with self.changed:
            return self.changed.wait_for(predicate, timeout)

    def freeze(self) -> None:
        """No status changes from now on: a suspending close keeps unfinished work resumable."""
        with self.lock:
            self.frozen = True
            self.changed.notify_all()  # callers waiting for work to end get their answer now

    def wait_final(self, is_final: Callable[[], bool], records: list[Record]) -> bool:
        """Block until `is_final()` and every event of `records` was heard (True), or a suspending close
        froze the book (False)."""
        def heard() -> bool:
            return not any(r.id in self._unheard for r in records)

        with self.changed:
            self.changed.wait_for(lambda: (is_final() and heard()) or self.frozen)
            return is_final()

    def _table(self, record: Record) -> dict:
        return {"session": self.sessions, "batch": self.batches, "item": self.items}[record.kind]
