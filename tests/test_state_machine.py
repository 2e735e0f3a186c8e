"""The protocol's status machine: every legal move allowed, every other refused, finals final."""

from __future__ import annotations

import itertools
import threading

import pytest

from embedded_worker.errors import InvalidState
from embedded_worker.state import (
    ALL_STATUSES,
    CANCELLED,
    COMPLETED,
    CREATED,
    FAILED,
    FINAL,
    PAUSED,
    PENDING,
    RUNNING,
    SessionRecord,
    StateBook,
)

LEGAL = {
    (CREATED, PENDING), (CREATED, CANCELLED), (CREATED, FAILED),
    (PENDING, RUNNING), (PENDING, PAUSED), (PENDING, CANCELLED), (PENDING, FAILED),
    (RUNNING, PAUSED), (RUNNING, COMPLETED), (RUNNING, FAILED), (RUNNING, CANCELLED),
    (PAUSED, PENDING), (PAUSED, CANCELLED), (PAUSED, FAILED),
}


def record_in(book: StateBook, status: str) -> SessionRecord:
    record = SessionRecord(id=f"s-{status}")
    record.status = status
    book.add(record)
    return record


@pytest.mark.parametrize(("current", "target"), list(itertools.product(ALL_STATUSES, ALL_STATUSES)))
def test_every_transition_is_legal_exactly_when_the_protocol_allows_it(current, target):
    persisted = []
    book = StateBook([lambda record, event: persisted.append((record, event))])
    record = record_in(book, current)
    persisted.clear()
    moved = book.transition(record, target)
    assert moved == ((current, target) in LEGAL)
    assert record.status == (target if moved else current)
    assert persisted == ([(record, "changed")] if moved else [])  # told before transition() returned


@pytest.mark.parametrize("final", sorted(FINAL))
def test_final_states_have_no_way_out_but_an_explicit_restart(final):
    book = StateBook()
    record = record_in(book, final)
    assert all(not book.transition(record, target) for target in ALL_STATUSES)
    assert record.status == final
    if final == COMPLETED:
        with pytest.raises(InvalidState, match="cannot restart in current status: completed"):
            book.begin_attempt(record)
    else:
        book.begin_attempt(record)
        assert (record.status, record.attempt, record.completed_at) == (PENDING, 2, None)


def test_times_are_stamped_by_the_transitions_that_mean_them():
    book = StateBook()
    record = record_in(book, CREATED)
    book.transition(record, PENDING)
    assert record.queued_at is not None and record.started_at is None
    book.transition(record, RUNNING)
    started = record.started_at
    book.transition(record, PAUSED)
    book.transition(record, PENDING)
    book.transition(record, RUNNING)
    assert record.started_at == started  # a resume is not a new start
    assert record.completed_at is None  # not finished yet
    book.transition(record, FAILED, "boom", {"error_code": "internal"})
    assert record.completed_at >= started and record.error == "boom"  # finished, stamped when it ended


def test_require_names_the_record_and_status_in_its_error():
    book = StateBook()
    record = record_in(book, COMPLETED)
    with pytest.raises(InvalidState, match=r"Session 's-completed' cannot pause in current status: completed"):
        book.require(record, PAUSED, "pause")


def test_events_leave_the_lock_in_order_and_a_listeners_own_changes_follow():
    """The outbox: listeners hear every change after the book's lock is released (another thread can take
    it meanwhile), in the order the changes were made, and a change a listener makes is heard after the
    one it reacts to, by every listener alike."""
    heard: dict[str, list] = {"first": [], "second": []}
    lock_free = []

    def first(record, event):
        lock_free.append(_in_other_thread(book))
        heard["first"].append((record.id, event, record.status))
        if record.id == "a" and record.status == RUNNING:
            book.transition(other, PENDING)  # a listener's own change: heard after this one

    def second(record, event):
        heard["second"].append((record.id, event, record.status))

    book = StateBook([first, second])
    record, other = SessionRecord(id="a"), SessionRecord(id="b")
    with book.locked():
        book.add(record)
        book.add(other)
        book.transition(record, PENDING)
        assert heard["first"] == []  # nothing heard while the lock is held
    book.transition(record, RUNNING)
    expected = [("a", "added", PENDING), ("b", "added", PENDING), ("a", "changed", PENDING),
                ("a", "changed", RUNNING), ("b", "changed", PENDING)]
    assert heard["first"] == heard["second"]
    assert [(i, e) for i, e, _ in heard["first"]] == [(i, e) for i, e, _ in expected]
    assert heard["first"][-2:] == expected[-2:] and all(lock_free)


def _in_other_thread(book: StateBook) -> bool:
    """True when another thread can take the book's lock now (so this thread does not hold it)."""
    result = []
    thread = threading.Thread(target=lambda: result.append(book.lock.acquire(timeout=5) and (book.lock.release()
                                                                                             or True)))
    thread.start()
    thread.join()
    return result == [True]


def test_a_failing_listener_neither_silences_the_others_nor_stalls_later_events():
    """A listener that raises (a full disk under the store) reaches the thread that made the change; every
    other listener still hears that event, and the events after it are not left in the outbox."""
    heard = []

    def failing(record, event):
        if record.id == "bad":
            raise OSError("disk full")

    book = StateBook([failing, lambda record, event: heard.append((record.id, event))])
    bad, good = SessionRecord(id="bad"), SessionRecord(id="good")
    with pytest.raises(OSError, match="disk full"):
        with book.locked():
            book.add(bad)
            book.add(good)
    assert heard == [("bad", "added"), ("good", "added")]
    assert not book._unheard and not book._outbox  # nothing left waiting to be heard
