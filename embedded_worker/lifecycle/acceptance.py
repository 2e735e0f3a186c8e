"""Acceptance: what every new session or batch passes, and what its caller may wait for or be told to expect.

The worker must be open, the queue must have room (sessions and batch items
count alike, checked and taken in one message to the lifecycle loop so
concurrent submits never pass it together), and the models' native sizes
are known before that message (a first model build may take a while). A `background: false`
caller waits here for its work to end; estimates come from measured step
times.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Callable

from ..errors import ResourceExhausted, Unavailable

if TYPE_CHECKING:
    from ..diffusion.device_pool import DevicePool
    from .jobs import JobService
    from .loop import LifecycleLoop
    from .planning import RunPlan
    from .state import Record, StateBook


class Acceptance:
    def __init__(self, book: StateBook, loop: LifecycleLoop, jobs: JobService, pool: DevicePool, max_queued_work: int,
                 max_items: int, max_batch_size: int, native_size: Callable[[str], tuple[int, int]]):
        self.book = book
        self.loop = loop
        self.jobs = jobs
        self.pool = pool
        self.max_queued_work = max_queued_work
        self.max_items = max_items  # items in one batch
        self.max_batch_size = max_batch_size
        self.native_size = native_size  # model id -> (width, height); may build the model the first time
        self.closing = threading.Event()

    def ensure_open(self) -> None:
        if self.closing.is_set():
            raise Unavailable("the worker is closing and accepts no new work")

    def check_capacity(self, adding: int) -> None:
        """On the loop, in the message that adds the records."""
        open_work = self.jobs.open_count()
        if open_work + adding > self.max_queued_work:
            raise ResourceExhausted(f"the queue is full: {open_work} unfinished sessions and items, limit "
                                    f"{self.max_queued_work}; retry later")

    def wait_final(self, record: Record, is_final: Callable[[], bool]) -> None:
        """Block a `background: false` caller until its work is final and stored (the loop answers after
        it emitted the change); a close that suspended it first is the caller's answer too."""
        book = self.book
        self.loop.wait_for(lambda: is_final() or book.frozen)
        if not is_final():
            raise Unavailable(f"the worker closed before {record.label()} finished; it was suspended and "
                              "resumes at the next start", details={"status": record.status})

    def estimate(self, plan: RunPlan, fallback_seconds: float) -> tuple[float, float]:
        """(queue wait, run time) in seconds from measured step times; the fallback before any. The run
        takes every step of the plan (`run_steps`); the images queued ahead are taken to be like its
        longest operation."""
        per_step = self.pool.seconds_per_step()
        if per_step is None:
            return 0.0, fallback_seconds
        steps = max((getattr(s.params, "steps", 0) for s in plan.steps if s.operation.on_device), default=0)
        queued_forwards = self.pool.pending() / self.max_batch_size
        return queued_forwards * steps * per_step, plan.run_steps * per_step
