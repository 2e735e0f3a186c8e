"""The one state of a session or batch item: every legal move allowed, every other refused, finals final,
the protocol's status derived from it, and only the lifecycle loop writes it."""

from __future__ import annotations

import itertools

import pytest

from embedded_worker.errors import InvalidState
from embedded_worker.lifecycle.loop import LifecycleLoop
from embedded_worker.lifecycle.state import (
    COMPLETED,
    PENDING,
    RUNNING,
    SessionRecord,
    StateBook,
    WorkState,
    protocol_status,
)

S = WorkState
LEGAL = {
    (S.CREATED, S.PENDING), (S.CREATED, S.CANCELLED), (S.CREATED, S.FAILED),
    (S.PENDING, S.RUNNING), (S.PENDING, S.PAUSING), (S.PENDING, S.PAUSED), (S.PENDING, S.CANCELLED),
    (S.PENDING, S.FAILED),
    (S.RUNNING, S.PAUSING), (S.RUNNING, S.PAUSED), (S.RUNNING, S.FINISHING), (S.RUNNING, S.FAILED),
    (S.RUNNING, S.CANCELLED),
    (S.PAUSING, S.PENDING), (S.PAUSING, S.RUNNING), (S.PAUSING, S.PAUSED), (S.PAUSING, S.FAILED),
    (S.PAUSING, S.CANCELLED),
    (S.PAUSED, S.PENDING), (S.PAUSED, S.CANCELLED), (S.PAUSED, S.FAILED),
    (S.FINISHING, S.COMPLETED), (S.FINISHING, S.FAILED), (S.FINISHING, S.CANCELLED),
}


@pytest.fixture
def loop():
    loop = LifecycleLoop()
    loop.start()
    yield loop
    loop.stop()


def make_book(loop: LifecycleLoop, listeners=()) -> StateBook:
    book = StateBook(loop, list(listeners))
    loop.after_each = book.emit
    return book


def record_in(book: StateBook, state: WorkState, started: bool = False) -> SessionRecord:
    record = SessionRecord(id=f"s-{state.value}", state=state, status=protocol_status(state, started),
                           started_at=1.0 if started else None)
    book.loop.call(book.add, record)
    return record


@pytest.mark.parametrize(("current", "target"), list(itertools.product(WorkState, WorkState)))
def test_every_move_is_legal_exactly_when_the_table_allows_it(loop, current, target):
    heard = []
    book = make_book(loop, [lambda record, event: heard.append((record.status, event))])
    record = record_in(book, current, started=True)
    heard.clear()
    before = record.status
    moved = loop.call(book.transition, record, target)
    assert moved == ((current, target) in LEGAL)
    assert record.state == (target if moved else current)
    assert record.status == protocol_status(record.state, True)
    changed = moved and record.status != before
    assert heard == ([(record.status, "changed")] if changed else [])  # emitted before the caller's answer


def test_the_protocol_shows_a_pausing_record_as_it_was_and_a_finishing_one_as_running():
    assert protocol_status(S.PAUSING, started=False) == PENDING
    assert protocol_status(S.PAUSING, started=True) == RUNNING
    assert protocol_status(S.FINISHING, started=True) == RUNNING
    assert {protocol_status(state, True) for state in WorkState} == {
        "created", "pending", "running", "paused", "completed", "failed", "cancelled"}


@pytest.mark.parametrize("final", [S.COMPLETED, S.FAILED, S.CANCELLED])
def test_final_states_have_no_way_out_but_an_explicit_restart(loop, final):
    book = make_book(loop)
    record = record_in(book, final)
    assert all(not loop.call(book.transition, record, target) for target in WorkState)
    assert record.state is final
    if final is S.COMPLETED:
        with pytest.raises(InvalidState, match="cannot restart in current status: completed"):
            loop.call(book.begin_attempt, record)
    else:
        loop.call(book.begin_attempt, record)
        assert (record.state, record.status, record.attempt, record.completed_at) == (S.PENDING, PENDING, 2, None)


def test_times_are_stamped_by_the_moves_that_mean_them(loop):
    book = make_book(loop)
    record = record_in(book, S.CREATED)
    move = lambda target, *more: loop.call(book.transition, record, target, *more)  # noqa: E731
    move(S.PENDING)
    assert record.queued_at is not None and record.started_at is None
    move(S.PAUSING)
    loop.call(book.note_started, record)  # its image started while the pause was on its way
    started = record.started_at
    assert started is not None and record.status == RUNNING and record.state is S.PAUSING
    move(S.PAUSED)
    move(S.PENDING)
    move(S.RUNNING)
    assert record.started_at == started  # a resume is not a new start
    assert record.completed_at is None  # not finished yet
    move(S.FAILED, "boom", {"error_code": "internal"})
    assert record.completed_at >= started and record.error == "boom"  # finished, stamped when it ended


def test_only_the_lifecycle_loop_writes_work_state(loop):
    book = make_book(loop)
    record = record_in(book, S.PENDING)
    with pytest.raises(RuntimeError, match="lifecycle loop only"):
        book.transition(record, S.RUNNING)
    with pytest.raises(RuntimeError, match="lifecycle loop only"):
        book.add(SessionRecord(id="other"))
    assert record.state is S.PENDING and "other" not in book.sessions


def test_changes_are_emitted_after_their_message_in_order_and_a_listeners_own_changes_follow(loop):
    """Change, then emit: listeners hear nothing while a message is applied, then every change it made in
    order, and a change a listener makes is heard after the one it reacts to, by every listener alike."""
    heard: dict[str, list] = {"first": [], "second": []}

    def first(record, event):
        heard["first"].append((record.id, event, record.status))
        if record.id == "a" and record.status == RUNNING:
            book.transition(other, S.PAUSED)  # a listener's own change (on the loop too): heard after this one

    def second(record, event):
        heard["second"].append((record.id, event, record.status))

    book = make_book(loop, [first, second])
    record, other = SessionRecord(id="a"), SessionRecord(id="b")

    def one_message():
        book.add(record)
        book.add(other)
        book.transition(record, S.PENDING)
        book.transition(other, S.PENDING)
        assert heard["first"] == []  # nothing heard while the message is applied

    loop.call(one_message)
    loop.call(book.transition, record, S.RUNNING)
    expected = [("a", "added"), ("b", "added"), ("a", "changed"), ("b", "changed"), ("a", "changed"),
                ("b", "changed")]
    assert heard["first"] == heard["second"]
    assert [(i, e) for i, e, _ in heard["first"]] == expected
    assert heard["first"][-2:] == [("a", "changed", RUNNING), ("b", "changed", "paused")]


def test_a_failing_listener_neither_silences_the_others_nor_stalls_later_changes(loop, caplog):
    """A listener that raises (a full disk under the store) is logged; every other listener still hears that
    change, and the changes after it are emitted too."""
    heard = []

    def failing(record, event):
        if record.id == "bad":
            raise OSError("disk full")

    book = make_book(loop, [failing, lambda record, event: heard.append((record.id, event))])
    loop.call(lambda: (book.add(SessionRecord(id="bad")), book.add(SessionRecord(id="good"))))
    assert heard == [("bad", "added"), ("good", "added")]
    assert "disk full" in caplog.text
    loop.call(book.transition, book.sessions["good"], S.PENDING)
    assert heard[-1] == ("good", "changed")


def test_a_caller_waiting_for_a_condition_is_answered_by_the_loop_after_the_change(loop):
    book = make_book(loop)
    record = record_in(book, S.PENDING)
    assert not loop.wait_for(lambda: record.status == COMPLETED, timeout=0.05)
    loop.call(book.transition, record, S.RUNNING)
    loop.post(book.transition, record, S.FINISHING)
    loop.post(book.transition, record, S.COMPLETED)
    assert loop.wait_for(lambda: record.status == COMPLETED, timeout=30)
