"""Recovery is a decision: from a stored record, the recovery mode and whether it can still be planned."""

from __future__ import annotations

import pytest

from embedded_worker.lifecycle.recovery_decisions import FAIL, KEEP_PAUSED, QUARANTINE, REQUEUE, decide
from embedded_worker.lifecycle.state import PAUSED, PENDING, RUNNING, ItemRecord, SessionRecord

CASES = [
    # status, on_device, recoveries, restarts, mode, cannot_resume -> action, isolated, error_code
    (PENDING, False, 0, 0, "requeue", None, REQUEUE, False, None),
    (RUNNING, False, 0, 0, "requeue", None, REQUEUE, False, None),
    (PAUSED, False, 0, 0, "requeue", None, KEEP_PAUSED, False, None),
    (RUNNING, True, 0, 0, "requeue", None, REQUEUE, True, None),  # a suspect: runs alone
    (RUNNING, True, 1, 1, "requeue", None, QUARANTINE, True, "internal"),  # died under it twice
    (PENDING, False, 0, 4, "requeue", None, QUARANTINE, False, "internal"),  # fifth start, still unfinished
    (RUNNING, False, 0, 0, "fail", None, FAIL, False, "unavailable"),
    (PAUSED, False, 0, 0, "requeue", ("model 'x' is not known", "not_found"), FAIL, False, "not_found"),
    (RUNNING, True, 1, 1, "fail", None, QUARANTINE, True, "internal"),  # quarantine says more than fail
]


@pytest.mark.parametrize(("status", "on_device", "recoveries", "restarts", "mode", "cannot_resume", "action",
                          "isolated", "code"), CASES)
def test_the_decision_table(status, on_device, recoveries, restarts, mode, cannot_resume, action, isolated, code):
    record = SessionRecord(id="s", status=status, on_device=on_device, recoveries=recoveries, restarts=restarts)
    decision = decide(record, mode, cannot_resume)
    assert (decision.action, decision.isolated, decision.error_code) == (action, isolated, code)
    assert decision.restarts == restarts + 1 and decision.recoveries == recoveries + on_device
    assert (record.restarts, record.recoveries, record.on_device) == (restarts, recoveries, on_device)  # pure


def test_reasons_say_what_happened():
    item = ItemRecord(id="b/i", batch_id="b", item_id="i", status=RUNNING, on_device=True, recoveries=1)
    assert "on the device, on 2 consecutive starts" in decide(item, "requeue", None).reason
    assert decide(item, "fail", None).reason.startswith("quarantined")
    fresh = ItemRecord(id="b/j", batch_id="b", item_id="j", status=PENDING)
    assert decide(fresh, "fail", None).reason == "the worker restarted before this item finished"
    assert decide(fresh, "requeue", ("gone", "not_found")).reason == "cannot resume after a restart: gone"
