"""A batch is a view over its items: its status, times, failure and figures follow from theirs."""

from __future__ import annotations

import pytest

from embedded_worker.lifecycle import batch_view
from embedded_worker.lifecycle.state import (
    CANCELLED,
    COMPLETED,
    CREATED,
    FAILED,
    PAUSED,
    PENDING,
    RUNNING,
    BatchRecord,
    ItemRecord,
)


def items(*statuses, started=False):
    made = []
    for index, status in enumerate(statuses):
        item = ItemRecord(id=f"b/i{index}", batch_id="b", item_id=f"i{index}", index=index, status=status)
        if started or status in (RUNNING, COMPLETED, FAILED, CANCELLED):
            item.started_at = 100.0 + index
        if status in (COMPLETED, FAILED, CANCELLED):
            item.completed_at = 200.0 + index
        made.append(item)
    return made


@pytest.mark.parametrize(("statuses", "expected"), [
    ((), CREATED),
    ((PENDING, PENDING), PENDING),
    ((PENDING, RUNNING), RUNNING),
    ((COMPLETED, PENDING), RUNNING),  # begun: between two cohorts it stays running
    ((PAUSED, PAUSED), PAUSED),
    ((COMPLETED, PAUSED, FAILED), PAUSED),  # every unfinished item paused
    ((RUNNING, PAUSED), RUNNING),  # a pause on its way
    ((COMPLETED, COMPLETED), COMPLETED),
    ((COMPLETED, FAILED), FAILED),
    ((COMPLETED, FAILED, CANCELLED), CANCELLED),  # cancelled by the caller: that is what it is
])
def test_status_follows_the_items(statuses, expected):
    assert batch_view.status(items(*statuses)) == expected


def test_a_resumed_batch_that_had_begun_is_running_one_that_had_not_is_pending():
    assert batch_view.status(items(PENDING, PENDING, started=True)) == RUNNING
    assert batch_view.status(items(PENDING, PENDING)) == PENDING


def test_times_and_failure_are_derived():
    members = items(COMPLETED, FAILED, COMPLETED)
    members[1].error, members[1].error_details = "boom", {"error_code": "internal"}
    assert batch_view.started_at(members) == 100.0 and batch_view.completed_at(members) == 202.0
    error, details = batch_view.failure(members)
    assert error == "1 of 3 items failed" and details == [{"item_id": "i1", "error": "boom", "error_code": "internal"}]
    assert batch_view.completed_at(items(COMPLETED, RUNNING)) is None
    assert batch_view.failure(items(COMPLETED, COMPLETED)) == (None, None)


def test_figures_count_progress_and_eta_from_the_items_runs():
    record = BatchRecord(id="b")
    members = items(COMPLETED, RUNNING, PENDING, PAUSED)
    progress = {"b/i1": 0.5}
    figures = batch_view.figures(record, members, lambda i: progress.get(i.id, 0.0), lambda i: 4.0)
    assert (figures["status"], figures["processed_items"], figures["running_items"], figures["pending_items"]) == (
        RUNNING, 1, 1, 2)
    assert figures["progress"] == pytest.approx(100 * 1.5 / 4)
    assert figures["eta_seconds"] is not None and figures["eta_seconds"] > 0
    done = batch_view.figures(record, items(COMPLETED, COMPLETED), lambda i: 0.0, lambda i: None)
    assert (done["status"], done["progress"], done["eta_seconds"]) == (COMPLETED, 100.0, 0.0)
