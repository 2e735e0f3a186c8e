"""Restore: a new process takes over what the last one left in the state store.

Completed work is listed and its outputs map back from disk. Each
unfinished session and batch item gets a recovery decision (`recovery`),
which the job service applies: requeued from its stored request, kept
paused, failed or quarantined. The unfinished items of a session's batch
(a coordination's batch_process step) are cancelled instead: the
session's next run deletes that batch and makes it again. Before any of it runs, output files no row
owns are swept; the report says so, and says when the last process's log
was lost (`StateStore.journal_loss`): what it held cannot be recovered,
only reported.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from ..errors import WorkerError
from . import recovery_decisions
from .state import FINAL, BatchRecord, ItemRecord, SessionRecord

if TYPE_CHECKING:
    from ..outputs.store import OutputStore
    from .batches import BatchService
    from .checkpoints import Checkpoints
    from .jobs import JobService
    from .sessions import SessionService
    from .state import Record, StateBook
    from .store import StateStore

log = logging.getLogger("embedded_worker.recovery")


def restore(store: StateStore, outputs: OutputStore, book: StateBook, jobs: JobService, sessions: SessionService,
            batches: BatchService, mode: str, checkpoints: Checkpoints) -> dict:
    """Load every stored record into the book and resume the unfinished ones; a report of what happened."""
    files = outputs.sweep_unowned()
    records = store.load_records()
    actions = (recovery_decisions.REQUEUE, recovery_decisions.KEEP_PAUSED, recovery_decisions.FAIL,
               recovery_decisions.QUARANTINE)
    report = {"records": len(records), "sessions": {}, "batches": {f"{action}_items": 0 for action in actions},
              "journal_loss": store.journal_loss, **files,
              "stale_checkpoints": checkpoints.keep_only({r.id for r in records if r.status not in FINAL})}
    if not records:
        return report
    ordered = sorted(records, key=lambda r: {"batch": 0, "item": 1, "session": 2}[r.kind])
    for record in ordered:
        book.add(record)
        if record.status in FINAL and record.kind != "batch":
            jobs.adopt(record)
    items: dict[str, list[ItemRecord]] = {}
    for record in ordered:
        if isinstance(record, ItemRecord):
            items.setdefault(record.batch_id, []).append(record)
    for record in ordered:
        if isinstance(record, SessionRecord) and record.status not in FINAL:
            action = _recover_session(record, jobs, sessions, mode)
            report["sessions"][action] = report["sessions"].get(action, 0) + 1
        elif isinstance(record, BatchRecord):
            members = [i for i in sorted(items.get(record.id, []), key=lambda i: i.index) if i.status not in FINAL]
            if members and record.session_id is not None:  # a session's batch: its session's next run makes it
                for item in members:  # again, so nothing of it is left unfinished without a run
                    jobs.adopt(item)
                    jobs.cancel(jobs.job(item.id), "the worker restarted; the session makes its batch again")
            elif members:
                sizing, plans = batches.recovery_plans(record, members)
                for item in members:
                    action = _apply(item, plans[item.id], jobs, mode, sizing)
                    report["batches"][f"{action}_items"] += 1
    log.info("recovered %d stored records: sessions %s, batch items %s", len(records), report["sessions"],
             report["batches"])
    return report


def _recover_session(record: SessionRecord, jobs: JobService, sessions: SessionService, mode: str) -> str:
    try:
        plan = sessions.plan_stored(record)
    except WorkerError as error:
        plan = error
    return _apply(record, plan, jobs, mode)


def _apply(record: Record, plan, jobs: JobService, mode: str, sizing=None) -> str:
    cannot_resume = (plan.message, plan.code) if isinstance(plan, WorkerError) else None
    decision = recovery_decisions.decide(record, mode, cannot_resume)
    jobs.recover(record, None if cannot_resume else plan, decision, sizing)
    return decision.action
