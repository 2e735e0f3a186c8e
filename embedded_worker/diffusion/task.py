"""DenoiseTask: one image on its way through a device, and what it tells its run.

The run that asked for it holds the task and its `future`; the queue and a
device worker move it between `queued`, `active` and `parked`. Owners never
touch those states directly: they ask the DevicePool to pause, resume or
cancel, and hear back through `listener` (on the device worker's event
thread). An active image asked to leave its forward says why in one field,
`leaving`, acted on at the next step boundary.
"""

from __future__ import annotations

import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from .denoise import Cohort, ImageSpec
    from .resume_points import ResumePoint


NEW, QUEUED, ACTIVE, PARKED, DONE = "new", "queued", "active", "parked", "done"
# why an active image leaves at the next step boundary; a later reason only replaces a weaker one
PREEMPT, PAUSE, CANCEL = "preempt", "pause", "cancel"
_STRENGTH = {None: 0, PREEMPT: 1, PAUSE: 2, CANCEL: 3}


class TaskListener(Protocol):
    def task_started(self, task: "DenoiseTask") -> None: ...

    def task_stepped(self, task: "DenoiseTask") -> None: ...

    def task_parked(self, task: "DenoiseTask") -> None: ...


@dataclass(frozen=True)
class BatchSizing:
    """What a batch asks of the forwards its images share (its BatchConfiguration)."""

    group: str  # the batch id
    limit: int  # at most this many of its images in flight at once
    minimum: int = 1  # memory pressure never shrinks its forwards below this
    memory_threshold: float | None = None  # fraction of device memory its forwards may fill

    @classmethod
    def for_configuration(cls, group: str, configuration) -> "BatchSizing":
        """Dynamic sizing: up to max_batch_size in flight, shrunk by memory down to min_batch_size.
        Fixed sizing: preferred_batch_size in flight, only an out-of-memory error shrinks it."""
        if configuration.enable_dynamic_sizing:
            return cls(group, configuration.max_batch_size, configuration.min_batch_size,
                       configuration.memory_threshold)
        return cls(group, configuration.preferred_batch_size, configuration.preferred_batch_size, None)


class DenoiseTask:
    """One image: its spec, its place in the queue, its progress and its result."""

    def __init__(
        self,
        spec: ImageSpec,
        priority: int,
        listener: TaskListener | None = None,
        sizing: BatchSizing | None = None,
        submitted_at: float | None = None,
        isolated: bool = False,
        record_id: str | None = None,
    ):
        self.spec = spec
        self.record_id = record_id  # the record it works for: stored as on the device while it runs
        self.priority = priority
        self.listener = listener
        self.sizing = sizing
        self.isolated = isolated  # a suspect after a crash: it shares no forward, so a next crash names it
        self.future: Future = Future()
        self.state = NEW  # guarded by the WorkQueue's lock
        self.leaving: str | None = None  # PREEMPT, PAUSE or CANCEL at the next step boundary; guarded by the queue
        self.preemptions = 0
        self.parked_at_step: int | None = None  # the step it was last preempted at: not again before progress
        self.preempted_by = ""  # why it was last asked to leave: "higher priority" or "fair share"
        self.waiting_for_device: str | None = None  # while preempted: what its status says it waits for
        self.parked: Cohort | None = None  # its own denoising state while paused
        # monotonic; when the request was accepted: FIFO order and aging count from here
        self.submitted_at = time.monotonic() if submitted_at is None else submitted_at
        self.run_started_at: float | None = None
        self.step = 0
        self.total_steps = spec.steps
        self.eta_seconds: float | None = None
        self.queue_entry: list | None = None
        self.rank = 0.0  # the queue's urgency key, lower first: priority aged from `submitted_at` (set by `put`)
        self.cohort_id: int | None = None  # which forward group it started in, for batch metrics
        self.finished_at: float | None = None
        self.worker: str | None = None  # the device worker that took it last: where it runs
        self.checkpoint_key: str | None = None  # its name among its record's images: checkpointed under it
        self.resume_from: ResumePoint | None = None  # a state to continue from instead of step 0
        self.resumed_from_step: int | None = None  # the step it did continue from

    @property
    def share_group(self):
        """Whose share of the device it counts against (fair share): its batch (sizing group), else the record
        that asked for it."""
        if self.sizing is not None:
            return self.sizing.group
        return self.record_id if self.record_id is not None else id(self)

    def ask_to_leave(self, reason: str) -> bool:
        """Leave at the next step boundary for `reason`, unless a stronger one is already asked; call with
        the queue's lock held."""
        if _STRENGTH[reason] <= _STRENGTH[self.leaving]:
            return False
        self.leaving = reason
        return True

    @property
    def progress(self) -> float:
        return self.step / self.total_steps if self.total_steps else 0.0

    def mark_queued(self) -> None:
        self.state = QUEUED

    def mark_active(self, worker: str) -> None:
        now = time.monotonic()
        self.worker = worker
        self.waiting_for_device = None
        if self.run_started_at is None:
            self.run_started_at = now
        self.state = ACTIVE
