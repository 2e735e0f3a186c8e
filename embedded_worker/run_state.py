"""RunState: where a workflow run is, one value, moved only along `_MOVES`.

A run's pause, resume, cancel and the end of its work all change this one
value under the run's lock; a move the table does not list is refused, so
a late event (a step ending after a cancel) cannot revive a run.
"""

from __future__ import annotations

import enum


class RunState(enum.Enum):
    """Where a run is; one value, moved only along `_MOVES`."""

    ACTIVE = "active"  # launching steps, or waiting for the ones in flight
    PAUSING = "pausing"  # asked to pause: its images park at their next step boundary, a CPU step finishes
    PAUSED = "paused"  # everything parked (or between two steps): nothing of it runs until `resume`
    ENDED = "ended"  # finished, failed or cancelled: `run_finished` was told, exactly once


_MOVES = {
    RunState.ACTIVE: {RunState.PAUSING, RunState.ENDED},
    RunState.PAUSING: {RunState.ACTIVE, RunState.PAUSED, RunState.ENDED},
    RunState.PAUSED: {RunState.ACTIVE, RunState.ENDED},
    RunState.ENDED: set(),
}


def can_move(current: RunState, target: RunState) -> bool:
    return target in _MOVES[current]
