"""A batch as a view over its items: status, times, counts, progress and ETA, derived, never stored apart.

A batch has no state machine of its own (as InvokeAI derives a batch's
status from its queue items): what it is follows from what its items are.
- all items final: `cancelled` if any was cancelled (only a cancel of the
  batch, or a close that cancels, cancels items), else `failed` if any
  failed (naming them), else `completed`;
- otherwise `running` while any item runs; `paused` when every unfinished
  item is paused; `running` when some item has begun or ended; else
  `pending`.
Every function here is pure: the batch service and the progress feed call
them with the items (and their runs' progress) they read.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Callable, Sequence

from .state import CANCELLED, COMPLETED, CREATED, FAILED, FINAL, PAUSED, PENDING, RUNNING

if TYPE_CHECKING:
    from .state import BatchRecord, ItemRecord


def status(items: Sequence[ItemRecord]) -> str:
    statuses = [item.status for item in items]
    if not statuses:
        return CREATED  # its items are not in the book yet (a start that is still loading them)
    unfinished = [s for s in statuses if s not in FINAL]
    if not unfinished:
        if CANCELLED in statuses:
            return CANCELLED
        return FAILED if FAILED in statuses else COMPLETED
    if RUNNING in unfinished:
        return RUNNING
    if all(s == PAUSED for s in unfinished):
        return PAUSED
    if len(unfinished) < len(statuses) or any(item.started_at is not None for item in items):
        return RUNNING
    return PENDING


def started_at(items: Sequence[ItemRecord]) -> float | None:
    return min((i.started_at for i in items if i.started_at is not None), default=None)


def completed_at(items: Sequence[ItemRecord]) -> float | None:
    if any(i.status not in FINAL for i in items):
        return None
    return max((i.completed_at for i in items if i.completed_at is not None), default=None)


def failure(items: Sequence[ItemRecord]) -> tuple[str | None, list[dict] | None]:
    """(error, details) of a batch that ended failed or cancelled; (None, None) otherwise."""
    state = status(items)
    if state == FAILED:
        failed = [i for i in items if i.status == FAILED]
        details = [{"item_id": i.item_id, "error": i.error, "error_code": (i.error_details or {}).get("error_code")}
                   for i in failed]
        return f"{len(failed)} of {len(items)} items failed", details
    if state == CANCELLED:
        return next((i.error for i in items if i.status == CANCELLED and i.error), None), None
    return None, None


def figures(record: BatchRecord, items: Sequence[ItemRecord], progress_of: Callable[[ItemRecord], float],
            eta_of: Callable[[ItemRecord], float | None]) -> dict:
    """Counts, progress (0-100), pace and ETA: what the status reply, the board and trackers show.
    `progress_of(item)`: 0..1 of its run; `eta_of(item)`: its run's ETA in seconds, if known."""
    statuses = [i.status for i in items]
    state = status(items)
    progress = sum(1.0 if i.status == COMPLETED else progress_of(i) for i in items)
    done = statuses.count(COMPLETED)
    remaining = sum(1 for s in statuses if s not in FINAL)
    begun = started_at(items)
    elapsed = ((completed_at(items) or time.time()) - begun) if begun else 0.0
    pace = done / elapsed if done and elapsed > 0 else 0.0
    if state in FINAL or not remaining:
        eta = 0.0
    elif pace > 0:
        eta = remaining / pace
    else:
        running = [e for e in (eta_of(i) for i in items if i.status == RUNNING) if e]
        waves = remaining / max(1, statuses.count(RUNNING))
        eta = max(running) * waves if running else None
    return {
        "batch_id": record.id,
        "status": state,
        "total_items": len(items),
        "processed_items": done,
        "failed_items": statuses.count(FAILED),
        "cancelled_items": statuses.count(CANCELLED),
        "pending_items": statuses.count(PENDING) + statuses.count(PAUSED),
        "running_items": statuses.count(RUNNING),
        "current_batch_size": statuses.count(RUNNING),
        "progress": 100 * progress / max(1, len(items)),
        "images_per_second": pace,
        "eta_seconds": eta,
    }
