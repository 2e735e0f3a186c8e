"""Recovery: what a new process does with each unfinished record the last one left in the state store.

A pure decision (`decide`) from a stored record, the configured recovery
mode and whether its request can still be planned; the job service applies
it. Unfinished work is requeued from its stored request (same seeds, so the
same pixels), kept paused, or failed when so configured or when it can no
longer run. Work whose images were on the device when the process died is
a suspect: it runs alone, and if the process dies under it again it is
quarantined as failed with the reason, instead of killing every start.
Anything still unfinished after RESTART_LIMIT starts is quarantined too, so
no cause of death can loop forever; a clean close (every thread stopped)
proves the work did not end the process, so it clears that count.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from .state import PAUSED

if TYPE_CHECKING:
    from .state import Record

QUARANTINE_AFTER = 2  # starts that found it on the device: then it is taken to be what kills the process
RESTART_LIMIT = 5  # starts that found it unfinished, whatever the cause

REQUEUE, KEEP_PAUSED, FAIL, QUARANTINE = "requeued", "paused", "failed", "quarantined"


@dataclass(frozen=True)
class Decision:
    action: str  # REQUEUE, KEEP_PAUSED, FAIL or QUARANTINE (also the word the recovery report counts)
    recoveries: int  # the record's counters, this start counted
    restarts: int
    reason: str | None = None  # why it fails
    error_code: str | None = None

    @property
    def isolated(self) -> bool:
        """A suspect runs alone: if the process dies again, nothing else is blamed."""
        return self.recoveries > 0


def decide(record: Record, mode: str, cannot_resume: tuple[str, str] | None) -> Decision:
    """What to do with unfinished `record` at this start. `mode`: the configured recovery ("requeue" or
    "fail"); `cannot_resume`: (message, error code) when its request can no longer be planned."""
    restarts = record.restarts + 1
    recoveries = record.recoveries + (1 if record.on_device else 0)
    counted = {"recoveries": recoveries, "restarts": restarts}
    if recoveries >= QUARANTINE_AFTER:
        return Decision(QUARANTINE, **counted, error_code="internal",
                        reason=f"quarantined: the worker process ended while its images were on the device, on "
                               f"{recoveries} consecutive starts")
    if restarts >= RESTART_LIMIT:
        return Decision(QUARANTINE, **counted, error_code="internal",
                        reason=f"quarantined: still unfinished after {restarts} starts of the worker")
    if mode == "fail":
        return Decision(FAIL, **counted, error_code="unavailable",
                        reason=f"the worker restarted before this {record.kind} finished")
    if cannot_resume is not None:
        message, code = cannot_resume
        return Decision(FAIL, **counted, error_code=code, reason=f"cannot resume after a restart: {message}")
    return Decision(KEEP_PAUSED if record.status == PAUSED else REQUEUE, **counted)
