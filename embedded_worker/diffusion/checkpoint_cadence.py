"""CheckpointCadence: when the images on one device have their state taken, so that checkpoints stay within
their share of the step time.

Taking a cohort's state (`DenoiseState.capture`, on the device thread) and
writing it (the checkpoint writer, off it) cost c seconds per image, both
measured. A device with n images that checkpoints each every K steps spends
c * n / K seconds per step on it, so K = ceil(c * n / (budget * step
seconds)). Until a write has been measured, a cohort is checkpointed at its
first step boundary: that measures it. A fixed `every_steps` overrides the
budget (tests, and a user who wants a known bound).
"""

from __future__ import annotations

import logging
import math
import time
from typing import TYPE_CHECKING, Protocol

from .denoise_state import DenoiseState, NotCapturable
from .smoothing import smoothed

if TYPE_CHECKING:
    from ..config import CheckpointConfig
    from .denoise import Cohort

log = logging.getLogger("embedded_worker.device")


class CheckpointSink(Protocol):
    """Where taken states go (`lifecycle.checkpoints.Checkpoints`): written off the taking thread."""

    seconds_per_image: float | None  # what writing one costs, measured

    def save(self, record_id: str, image: str, state: DenoiseState) -> None: ...


def hand_over(cohort: Cohort, sink: CheckpointSink, interval: int = 0) -> int:
    """Take the state of `cohort`'s members that are checkpointed (a record's images) and hand it to `sink`;
    how many were. `interval`: the steps until their next checkpoint (0: they stop here)."""
    keyed = [task.checkpoint_key is not None for task in cohort.members]
    if not any(keyed):
        return 0
    try:
        states = DenoiseState.capture(cohort, interval)
    except NotCapturable as error:
        log.warning("images of %s cannot be checkpointed: %s", cohort.specs[0].model_id, error)
        return 0
    for task, state, key in zip(cohort.members, states, keyed):
        if key:
            sink.save(task.record_id, task.checkpoint_key, state)
    cohort.checkpointed_at, cohort.promised_every = cohort.step_index, interval or None
    return sum(keyed)


def hand_over_waiting(tasks: list, sink: CheckpointSink) -> None:
    """A suspending close: images off every device (preempted and queued, or paused) leave their state, to
    continue at their step after a restart: their parked cohort's, or the state they hold only in memory
    (a paused image's moved to host memory, an actor's sent back to the head)."""
    parked = {}
    for task in tasks:
        if task.parked is not None:
            parked[id(task.parked)] = task.parked  # one capture per cohort, for all its members
        elif task.resume_from is not None and task.resume_from.in_memory_only and task.checkpoint_key is not None:
            sink.save(task.record_id, task.checkpoint_key, task.resume_from)
    for cohort in parked.values():
        hand_over(cohort, sink)


class CheckpointCadence:
    def __init__(self, sink: CheckpointSink, settings: CheckpointConfig):
        self.sink = sink
        self.budget = settings.budget
        self.every_steps = settings.every_steps
        self.capture_seconds: float | None = None  # per image, on the device thread, smoothed
        self.images_taken = 0
        self.interval_steps: int | None = None  # the interval the last step boundary used

    def interval(self, images: int, seconds_per_step: float | None) -> int:
        """Steps between two checkpoints of an image now; 1 until the cost is known."""
        if self.every_steps is not None:
            return self.every_steps
        write = self.sink.seconds_per_image
        if write is None or self.capture_seconds is None or not seconds_per_step:
            return 1
        return max(1, math.ceil((self.capture_seconds + write) * images / (self.budget * seconds_per_step)))

    def after_step(self, cohorts: list[Cohort], images: int, seconds_per_step: float | None) -> None:
        """At a step boundary: the unfinished cohorts due for a checkpoint have their state taken. A cohort's
        next checkpoint never comes later than the interval its last one carries (`DenoiseState.interval`),
        however the interval grew since (the first, uncalibrated one is 1): that is what makes it a bound."""
        every = self.interval_steps = self.interval(images, seconds_per_step)
        for cohort in cohorts:
            due = every if cohort.promised_every is None else min(every, cohort.promised_every)
            if not cohort.finished and cohort.step_index - cohort.checkpointed_at >= due:
                self.take(cohort, every)

    def take(self, cohort: Cohort, interval: int = 0) -> None:
        """Take `cohort`'s state now; `interval`: the steps until its next checkpoint (0: a suspend, the
        images stop here)."""
        started = time.perf_counter()
        taken = hand_over(cohort, self.sink, interval)
        if taken:
            self.capture_seconds = smoothed(self.capture_seconds, (time.perf_counter() - started) / taken)
            self.images_taken += taken
