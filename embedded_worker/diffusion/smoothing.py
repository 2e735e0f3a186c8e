"""One way to follow a measured cost: step times, decode times, what a checkpoint costs to take and to write."""

from __future__ import annotations


def smoothed(average: float | None, sample: float) -> float:
    """An exponential moving average: steady enough for an ETA, quick to follow a change of load."""
    return sample if average is None else 0.8 * average + 0.2 * sample
