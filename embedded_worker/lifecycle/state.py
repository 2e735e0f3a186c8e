"""Session, batch and item records, their one state, and the one place it changes.

Design notes
- A session or a batch item is in exactly one `WorkState`, moved only along
  `_MOVES` by `StateBook.transition`. It carries what the protocol does not
  show (PAUSING: parks at the next step boundary; FINISHING: its outputs are
  being written), and the protocol's seven statuses are derived from it
  (`protocol_status`) into `Record.status`, which replies, the board and the
  store read. A batch's status is derived from its items (`batch_view`).
- Only the lifecycle loop writes (`lifecycle_loop`): every method that
  changes the book checks it runs there. Changes are recorded in order and
  emitted after the message that made them (`emit`: the store first, then
  the board and trackers, then retention), so no listener ever sees a
  half-made change and a caller answered after the message hears a status
  that is already on disk.
- `completed`, `failed` and `cancelled` are final: nothing the engine does
  moves them. The one exit is an explicit restart of a failed or cancelled
  record, which starts a new attempt (counted in `attempt`). A completed
  record is never re-run: its outputs are the answer.
- Progress (step, substep, ETA) is not kept here: it lives in the run doing
  the work, and status replies read it there.
"""

from __future__ import annotations

import enum
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from ..errors import InvalidRequest, InvalidState

if TYPE_CHECKING:
    from .loop import LifecycleLoop

log = logging.getLogger("embedded_worker.state")

CREATED = "created"
PENDING = "pending"
RUNNING = "running"
PAUSED = "paused"
COMPLETED = "completed"
FAILED = "failed"
CANCELLED = "cancelled"

ALL_STATUSES = (CREATED, PENDING, RUNNING, PAUSED, COMPLETED, FAILED, CANCELLED)
FINAL = frozenset({COMPLETED, FAILED, CANCELLED})


class WorkState(enum.Enum):
    """Where a session or batch item is; one value, moved only along `_MOVES`."""

    CREATED = CREATED
    PENDING = PENDING  # waiting for a device (or for its next step)
    RUNNING = RUNNING
    PAUSING = "pausing"  # asked to pause: its images park at their next step boundary, a CPU step finishes
    PAUSED = PAUSED  # nothing of it runs until a resume
    FINISHING = "finishing"  # every step ended; its outputs are being written
    COMPLETED = COMPLETED
    FAILED = FAILED
    CANCELLED = CANCELLED

    @property
    def final(self) -> bool:
        return self.value in FINAL


S = WorkState
_MOVES: dict[WorkState, frozenset[WorkState]] = {
    S.CREATED: frozenset({S.PENDING, S.CANCELLED, S.FAILED}),
    S.PENDING: frozenset({S.RUNNING, S.PAUSING, S.PAUSED, S.CANCELLED, S.FAILED}),
    S.RUNNING: frozenset({S.PAUSING, S.PAUSED, S.FINISHING, S.FAILED, S.CANCELLED}),
    S.PAUSING: frozenset({S.PENDING, S.RUNNING, S.PAUSED, S.FAILED, S.CANCELLED}),
    S.PAUSED: frozenset({S.PENDING, S.CANCELLED, S.FAILED}),
    S.FINISHING: frozenset({S.COMPLETED, S.FAILED, S.CANCELLED}),
    S.COMPLETED: frozenset(),
    S.FAILED: frozenset(),
    S.CANCELLED: frozenset(),
}
RESTARTABLE = frozenset(state for state in WorkState if state is not S.COMPLETED and state is not S.CREATED)


def is_legal(current: WorkState, target: WorkState) -> bool:
    return target in _MOVES[current]


def protocol_status(state: WorkState, started: bool) -> str:
    """What the protocol shows: a pausing record is still what it was, a finishing one still running."""
    if state is S.PAUSING:
        return RUNNING if started else PENDING
    if state is S.FINISHING:
        return RUNNING
    return state.value


def status_counts(statuses: list[str]) -> dict:
    """How many are in each status, and in all: what get_status reports for sessions and for batches."""
    return {status: statuses.count(status) for status in set(statuses)} | {"total": len(statuses)}


@dataclass(eq=False)
class Record:
    """What every tracked unit of work has: identity, status and its times."""

    id: str
    priority: int = 5
    status: str = CREATED  # the protocol's view of `state`, written with it
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
    # the one state; not stored (the row keeps `status`), read back from `status` by a next start
    state: WorkState | None = field(default=None, metadata={"stored": False})

    kind = "record"

    def __post_init__(self) -> None:
        if self.state is None:
            self.state = WorkState(self.status)

    def label(self) -> str:
        return f"{self.kind.capitalize()} '{self.id}'"


@dataclass(eq=False)
class SessionRecord(Record):
    workflow_id: str | None = None
    request: dict = field(default_factory=dict)
    total_steps: int = 0
    outputs: list[dict] = field(default_factory=list)
    board_slot: int = -1
    step_results: list[dict] = field(default_factory=list)  # as its run ended: what a next start shows

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
    session_id: str | None = None  # a coordination's batch_process step made it: the session waiting on it

    kind = "batch"


ADDED, CHANGED, REMOVED = "added", "changed", "removed"
Listener = Callable[[Record, str], None]


class StateBook:
    """Owns every record; every state change goes through `transition`, on the lifecycle loop."""

    def __init__(self, loop: LifecycleLoop, listeners: list[Listener] | None = None):
        self.loop = loop
        self.listeners: list[Listener] = list(listeners or [])  # hear each change after its message, in order
        self.frozen = False  # set by a suspending close: statuses stay as last stored, for the next start
        self.sessions: dict[str, SessionRecord] = {}
        self.batches: dict[str, BatchRecord] = {}
        self.items: dict[str, ItemRecord] = {}
        self._changes: deque[tuple[Record, str]] = deque()  # recorded by the message, emitted after it
        self._poked = False  # a change no listener hears (a freeze, a pausing record's start): waiters look again

    def emit(self) -> bool:
        """After each message: every recorded change to the listeners, in order; a listener's own changes
        follow. A failing listener is logged (the store keeps what the disk refuses) and the others hear it.
        Whether anything changed (a freeze counts)."""
        changed, self._poked = bool(self._changes) or self._poked, False
        while self._changes:
            record, event = self._changes.popleft()
            for listener in self.listeners:
                try:
                    listener(record, event)
                except Exception:
                    log.exception("a listener of %s failed", record.label())
        return changed

    def _record(self, record: Record, event: str) -> None:
        self._changes.append((record, event))

    def add(self, record: Record) -> None:
        self.loop.require_loop()
        self._table(record)[record.id] = record
        self._record(record, ADDED)

    def require_free_id(self, record: Record, more_ids: list[str] = ()) -> None:
        """Sessions, batches and items share one namespace of ids (one row each in the store, one owner
        of outputs and board slots): a new record whose id (or whose items' ids) another kind of record
        already has is refused."""
        for record_id in (record.id, *more_ids):
            for table in (self.sessions, self.batches, self.items):
                other = table.get(record_id)
                if other is not None:
                    field = f"{record.kind}_id"
                    raise InvalidRequest(f"{field}: '{record_id}' is already the id of {other.label()}",
                                         details={"field": field, "taken_by": other.kind})

    def remove(self, record: Record) -> None:
        self.loop.require_loop()
        if self._table(record).pop(record.id, None) is not None:
            self._record(record, REMOVED)

    def update(self, record: Record) -> None:
        """Fields other than the state changed (outputs, attempt, the device mark): stored and published
        like a state change; nothing once frozen."""
        self.loop.require_loop()
        if not self.frozen:
            self._record(record, CHANGED)

    def transition(self, record: Record, target: WorkState, error: str | None = None, details: Any = None) -> bool:
        """Move `record` to `target`; False (and no change) when the move is illegal."""
        self.loop.require_loop()
        if self.frozen or not is_legal(record.state, target):
            return False
        now = time.time()
        if target is S.PENDING and record.queued_at is None:
            record.queued_at = now
        if target is S.RUNNING and record.started_at is None:
            record.started_at = now
        if target.final:
            record.completed_at = now
            if error is not None:
                record.error = error
                record.error_details = details
        self._set(record, target)
        return True

    def _set(self, record: Record, state: WorkState) -> None:
        record.state, self._poked = state, True  # a state a waiter waits for may show no new status
        status = protocol_status(state, record.started_at is not None)
        if status != record.status:
            record.status = status
            self._record(record, CHANGED)

    def note_started(self, record: Record) -> None:
        """A pausing record's work started after all (it stays pausing): stamped, and shown as running."""
        self.loop.require_loop()
        if record.started_at is None and not self.frozen:
            record.started_at = time.time()
            self._set(record, record.state)

    def begin_attempt(self, record: Record) -> None:
        """Restart: a new attempt of the same request, from pending."""
        self.loop.require_loop()
        if record.state not in RESTARTABLE:
            raise InvalidState(f"{record.label()} cannot restart in current status: {record.status}")
        record.attempt += 1
        record.queued_at = time.time()
        record.started_at = record.completed_at = None
        record.error = record.error_details = None
        record.state, record.status = S.PENDING, PENDING
        self._record(record, CHANGED)

    def session_statuses(self) -> list[str]:
        return [r.status for r in list(self.sessions.values())]

    def freeze(self) -> None:
        """No state changes from now on: a suspending close keeps unfinished work resumable."""
        self.loop.require_loop()
        self.frozen = True
        self._poked = True

    def _table(self, record: Record) -> dict:
        return {"session": self.sessions, "batch": self.batches, "item": self.items}[record.kind]
