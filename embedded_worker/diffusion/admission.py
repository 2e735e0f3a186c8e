"""Admission: which queued images join a device worker's next forward.

Design notes
- Iteration-level batching: between any two steps the worker admits queued
  images into its active set. The active set holds one forward key (model,
  size, guidance mode) at a time. When a more urgent task of another key
  waits, admission stops and the set drains, then switches: urgency
  decides, aging prevents starvation.
- Capacity comes from the memory-aware sizer, under the strictest
  preferences of the batches in flight (minimum size, memory threshold); a
  batch's images take at most its `limit` places; an isolated image (a
  suspect after a crash) runs alone.
- Preemption (`scheduling.preempt`): when the active set is full and a
  waiting image should run before one in it (a higher priority whose aged
  rank is also better, or under `fair` a group with far fewer images in
  flight), the less urgent image is asked to leave at the next step
  boundary (`PREEMPT`); the worker parks it exactly as a pause does and puts
  it back in the queue at its old rank. Not again before it made a step of
  progress, never for less than one step of gain, and never more than
  `max_preemptions` times (`scheduling.max_preemptions_per_image`): a
  stream of urgent arrivals would otherwise park the same image at every
  boundary (7 times in one 12-step run).
- Cost-aware admission: while images of a higher priority run, lower ones
  join their forward only while that costs the urgent images less than one
  of their steps over their remaining run, judged on learned seconds per
  forward against its size (`ForwardTimes`).
- Everything here runs under the queue's condition lock, on the worker's
  thread; it decides and marks, the worker moves the images.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import TYPE_CHECKING, Callable

from .memory import ForwardTimes
from .task import PREEMPT

if TYPE_CHECKING:
    from .memory import BatchSizer
    from .task import DenoiseTask
    from .work_queue import WorkQueue


class Admission:
    def __init__(self, queue: WorkQueue, sizer: BatchSizer, coalesce_wait_s: float, preempt: bool,
                 max_preemptions: int):
        self.queue = queue
        self.sizer = sizer
        self.coalesce_wait_s = coalesce_wait_s
        self.preempt = preempt
        self.max_preemptions = max_preemptions  # per image: past it, it runs to its end
        self.forward_times = ForwardTimes()
        self.capacity = sizer.max_batch_size
        self.capacity_reason = "configured"
        self.key: tuple | None = None  # the forward key of the active set
        self._coalesce_until: float | None = None

    def decide(self, active: list[DenoiseTask]) -> tuple[list[DenoiseTask] | None, float | None]:
        """(images to admit now, None) or (None, seconds to wait first; None: until the queue changes).
        An empty list with images active means: step without admitting (draining for another key)."""
        queue = self.queue
        if not active:
            key = queue.best_key()
            if key is None:
                self.key = self._coalesce_until = None
                return None, None
            capacity, _ = self.sizer.size(key, *self._preferences(active, queue.peek(key)))
            if self.coalesce_wait_s > 0 and queue.count(key) < capacity:
                now = time.monotonic()
                self._coalesce_until = self._coalesce_until or now + self.coalesce_wait_s
                if now < self._coalesce_until:
                    return None, self._coalesce_until - now
            self.key = key
        elif queue.outranked(self.key):
            if self.preempt:  # park what the other key's best outranks; drain the rest
                urgent = queue.peek(queue.best_key())
                for task in self._preemptible(active):
                    if outranks(urgent, task) and task.ask_to_leave(PREEMPT):
                        task.preempted_by = "higher priority"
            return [], None  # drain the active set, then switch to the more urgent key
        self._coalesce_until = None
        minimum, threshold = self._preferences(active, queue.peek(self.key))
        self.capacity, self.capacity_reason = self.sizer.size(self.key, minimum, threshold)
        in_flight = Counter(t.share_group for t in active)
        limit = self.capacity - len(active)
        if self.preempt and active:
            limit = self._preempt_for(active, in_flight, limit)
        return queue.take(self.key, limit, self._acceptor(active), in_flight), None

    def _preemptible(self, active: list[DenoiseTask]) -> list[DenoiseTask]:
        """Active images that may be parked now: not alone by isolation, not already leaving, preempted
        fewer than `max_preemptions` times, progressed since they were last parked, and with more than one
        step left (a last step gains nobody anything)."""
        if any(t.isolated for t in active):
            return []
        return [t for t in active
                if t.leaving is None
                and t.preemptions < self.max_preemptions
                and (t.parked_at_step is None or t.step > t.parked_at_step)
                and t.total_steps - t.step > 1]

    def _preempt_for(self, active: list[DenoiseTask], in_flight: Counter, free: int) -> int:
        """Choose who leaves this boundary for whom; mark them and return how many images to admit.

        Walk the waiting images in the order the queue would admit them: each
        takes a free place, else displaces the least urgent active image it may
        (`_displaces`). Then, if the forward now mixes priorities, cap it at the
        size the urgent images' learned cost allows (`_forward_target`), parking
        lower-priority images beyond it."""
        waiting = self.queue.preview(self.key, self.capacity, in_flight)
        counts = Counter(in_flight)
        places = free
        eligible = self._preemptible(active)
        victims: list[DenoiseTask] = []
        admitted: list[DenoiseTask] = []
        for task in waiting:
            if free <= 0:
                pool = [v for v in eligible if v not in victims and self._displaces(task, v, counts)]
                if not pool:
                    break
                victim = max(pool, key=lambda v: (-v.priority, counts[v.share_group], v.rank))
                victims.append(victim)
                counts[victim.share_group] -= 1
                free += 1
                places += 1
            free -= 1
            admitted.append(task)
            counts[task.share_group] += 1
        staying = [t for t in active if t not in victims]
        present = staying + admitted + [t for t in waiting if t not in admitted]
        top = max((t.priority for t in staying + admitted), default=None)
        if top is not None and any(t.priority < top for t in present):
            urgent = [t for t in staying + waiting if t.priority == top][: self.capacity]
            remaining = max(t.total_steps - t.step for t in urgent)
            target = max(len(urgent), self._forward_target(len(urgent), remaining))
            joining = sum(1 for t in urgent if t not in staying)
            # lower-priority images beyond the target leave, least urgent first
            lower = sorted((t for t in staying if t.priority < top and t in eligible), key=lambda t: t.rank)
            while len(staying) + joining > target and lower:
                victim = lower.pop()
                victims.append(victim)
                staying.remove(victim)
            places = max(0, target - len(staying))
        for victim in victims:
            victim.ask_to_leave(PREEMPT)
            displaced_by_rank = any(outranks(t, victim) for t in admitted) or victim.priority < (top or 0)
            victim.preempted_by = "higher priority" if displaced_by_rank else "fair share"
        return places

    def _displaces(self, waiting: DenoiseTask, active: DenoiseTask, counts: Counter) -> bool:
        """May `waiting` take `active`'s place now? More urgent, or (fair) a group well under its share."""
        if outranks(waiting, active):
            return True
        mine, theirs = waiting.share_group, active.share_group
        return (self.queue.policy == "fair" and waiting.priority == active.priority
                and mine != theirs and counts[theirs] > counts[mine] + 1)

    def _forward_target(self, urgent: int, remaining_steps: int) -> int:
        """How many images a forward may hold while `urgent` images of a higher priority run in it:
        the most that cost them less than one of their steps over their remaining run, by learned
        seconds per forward. Unmeasured: the configured capacity (join, and learn)."""
        alone = self.forward_times.estimate(self.key, urgent)
        if alone is None:
            return self.capacity
        size = urgent
        for images in range(urgent + 1, self.capacity + 1):
            seconds = self.forward_times.estimate(self.key, images)
            if seconds is None or (seconds - alone) * remaining_steps >= alone:
                break
            size = images
        return size

    @staticmethod
    def _preferences(active: list[DenoiseTask], next_task: DenoiseTask | None) -> tuple[int, float | None]:
        """The strictest batch preferences among the images in flight and the next one to admit:
        (minimum size, memory threshold)."""
        tasks = active + ([next_task] if next_task is not None else [])
        sizings = [t.sizing for t in tasks if t.sizing is not None]
        thresholds = [s.memory_threshold for s in sizings if s.memory_threshold is not None]
        return max((s.minimum for s in sizings), default=1), min(thresholds, default=None)

    @staticmethod
    def _acceptor(active: list[DenoiseTask]) -> Callable[[DenoiseTask], bool]:
        in_group: dict[str, int] = Counter(t.sizing.group for t in active if t.sizing is not None)
        taken: list[DenoiseTask] = []

        def accept(task: DenoiseTask) -> bool:
            # an isolated image runs alone: nothing joins it and it joins nothing
            if any(t.isolated for t in active + taken) or (task.isolated and (active or taken)):
                return False
            if task.sizing is not None:  # a batch's images take at most its `limit` places in flight
                if in_group[task.sizing.group] >= task.sizing.limit:
                    return False
                in_group[task.sizing.group] += 1
            taken.append(task)
            return True

        return accept


def outranks(waiting: DenoiseTask | None, active: DenoiseTask) -> bool:
    """More urgent both by priority and by aged rank: aging, which lifts long-waiting work, still holds."""
    return waiting is not None and waiting.priority > active.priority and waiting.rank < active.rank
