"""Recovery: a new process takes over what the last one left in the state store.

Completed work is listed and its outputs map back from disk. Unfinished work
is requeued from its stored request (same seeds, so the same pixels), or
failed when so configured. Work whose images were on the device when the
process died is a suspect: it runs alone, and if the process dies under it
again it is quarantined as failed with the reason, instead of killing every
start. Anything still unfinished after RESTART_LIMIT starts is failed too, so
no cause of death can loop forever.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from .state import FINAL, BatchRecord, ItemRecord, SessionRecord

if TYPE_CHECKING:
    from .engine import Engine

log = logging.getLogger("embedded_worker.recovery")
QUARANTINE_AFTER = 2  # starts that found it on the device: then it is taken to be what kills the process
RESTART_LIMIT = 5  # starts that found it unfinished, whatever the cause


def suspect_check(record) -> str | None:
    """Count this start against `record`; the reason to quarantine it, if it has run out of chances."""
    record.restarts += 1
    if record.on_device:
        record.recoveries += 1
        record.on_device = False
    if record.recoveries >= QUARANTINE_AFTER:
        return (f"quarantined: the worker process ended while its images were on the device, on "
                f"{record.recoveries} consecutive starts")
    if record.restarts >= RESTART_LIMIT:
        return f"quarantined: still unfinished after {record.restarts} starts of the worker"
    return None


def recover(engine: "Engine") -> dict:
    """Load every stored record into the book and resume the unfinished ones; a report of what happened."""
    records = engine.store.load_records()
    report = {"records": len(records), "sessions": {}, "batches": {"requeued_items": 0, "paused_items": 0,
                                                                    "failed_items": 0, "quarantined_items": 0}}
    if not records:
        return report
    ordered = sorted(records, key=lambda r: {"batch": 0, "item": 1, "session": 2}[r.kind])
    for record in ordered:
        engine.book.add(record)
    items: dict[str, list[ItemRecord]] = {}
    for record in ordered:
        if isinstance(record, ItemRecord):
            items.setdefault(record.batch_id, []).append(record)
    for record in ordered:
        if isinstance(record, SessionRecord) and record.status not in FINAL:
            outcome = engine.sessions.recover(record)
            report["sessions"][outcome] = report["sessions"].get(outcome, 0) + 1
        elif isinstance(record, BatchRecord) and record.status not in FINAL:
            members = sorted(items.get(record.id, []), key=lambda i: i.index)
            for outcome, count in engine.batches.recover(record, members).items():
                report["batches"][f"{outcome}_items"] += count
    log.info("recovered %d stored records: sessions %s, batch items %s", len(records), report["sessions"],
             report["batches"])
    return report
