"""WorkQueue: images waiting for a device, in priority order, grouped by what can share a forward.

Design notes
- Priority 1-10, higher first, and aging: a task gains `aging_per_second`
  points while it waits. Every task ages at the same rate, so "priority +
  rate x waited" orders tasks exactly as the fixed key "rate x submitted_at -
  priority" does (`rank`, lower first): keyed once, correct forever.
- Within one priority the policy decides (`scheduling.policy`):
  `fifo`: by when the request was accepted, so a 1000-item batch goes
  before a session that came a moment later. `fair`: between groups (a
  batch, or the request that made a session's images), by images in flight:
  the group with the fewest on the device (counting what this admission
  already took) goes next, deficit round-robin by images. Across priorities
  the aged rank decides in both policies.
- One heap per (forward key, group): a device worker fills its next forward
  from one key at a time, and each group's own order is its rank order, so
  choosing between groups only looks at their heads.
- The heads themselves sit in one heap per priority (`OwnerHeads`), so a
  choice costs O(log groups), not a look at every group: the device thread
  decides under this lock at every step boundary, and with 4,000 groups
  waiting a decision took 57 ms here (submits, pauses and cancels waited
  on it). Under `fair` the group with the fewest images in flight is the
  most urgent idle head of the level, or one of the groups with images in
  flight (a few: the active set and what this admission took).
- Removal is lazy: a paused or cancelled task's heap entry is blanked and
  skipped when it surfaces.
- The condition's lock also guards every task's `state`, so "is it still
  queued?" and "take it" never race.
"""

from __future__ import annotations

import heapq
import itertools
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from .task import DONE, QUEUED

if TYPE_CHECKING:
    from .task import DenoiseTask


POLICIES = ("fair", "fifo")


class OwnerHeads:
    """One forward key's waiting images: each group's own heap in rank order, and per priority a heap of
    the groups' heads, so choosing the next group looks at a few heads, never at every group.

    Every group with images has exactly one published head item, (rank, submitted_at, order, token,
    group) in its head's priority heap, named by the token in `published`, and it is live: a withdrawn head
    is replaced at once. Items a group's later head replaced are stale and dropped when they surface; a
    fresh token each time keeps an entry that comes back as head (refused by a take) from counting twice."""

    def __init__(self):
        self.groups: dict[object, list[list]] = {}  # group -> its entries, a heap by rank
        self.levels: dict[int, list[tuple]] = {}  # priority -> heap of head items
        self.published: dict[object, tuple[int, list]] = {}  # group -> (token of its head item, head entry)
        self._tokens = itertools.count()
        self.live = 0  # entries not blanked

    def push(self, entry: list) -> None:
        heap = self.groups.setdefault(entry[-1].share_group, [])
        heapq.heappush(heap, entry)
        self.live += 1
        if heap[0] is entry:
            self.head(entry[-1].share_group)

    def blank(self, entry: list) -> None:
        """A withdrawn entry stays in its heap, blanked; if it was its group's head, the next one is published."""
        group = entry[-1].share_group
        entry[-1] = None
        self.live -= 1
        if self.groups[group][0] is entry:
            self.head(group)

    def pop(self, group) -> list:
        """Take `group`'s head entry (live: `head` was asked first)."""
        entry = heapq.heappop(self.groups[group])
        self.live -= 1
        self.head(group)
        return entry

    def head(self, group) -> list | None:
        """`group`'s most urgent live entry, published in its priority's heap; None when it has none."""
        heap = self.groups.get(group)
        while heap and heap[0][-1] is None:
            heapq.heappop(heap)
        if not heap:
            self.groups.pop(group, None)
            self.published.pop(group, None)
            return None
        head = heap[0]
        if self.published.get(group, (None, None))[1] is not head:
            token = next(self._tokens)
            self.published[group] = (token, head)
            heapq.heappush(self.levels.setdefault(head[-1].priority, []), (*head[:3], token, group))
        return head

    def level_top(self, priority: int) -> tuple | None:
        """The most urgent group's head item among heads of `priority`."""
        heap = self.levels.get(priority)
        while heap and self.published.get(heap[0][4], (None,))[0] != heap[0][3]:
            heapq.heappop(heap)  # stale: the group's head changed since
        return heap[0] if heap else None

    def top(self) -> tuple[list, int] | None:
        """(the most urgent head entry of all, its priority)."""
        best = None
        for priority in list(self.levels):
            item = self.level_top(priority)
            if item is None:
                del self.levels[priority]
            elif best is None or item[:3] < best[0][:3]:
                best = (item, priority)
        return (self.groups[best[0][4]][0], best[1]) if best else None

    def first_idle(self, priority: int, counts: dict) -> tuple | None:
        """The most urgent head item of `priority` whose group has no image counted in `counts`. The groups
        skipped on the way are those in `counts`: few (the active set and what this admission took)."""
        skipped, found = [], None
        while (item := self.level_top(priority)) is not None:
            if counts.get(item[4], 0) == 0:
                found = item
                break
            skipped.append(heapq.heappop(self.levels[priority]))
        for item in skipped:
            heapq.heappush(self.levels.setdefault(priority, []), item)
        return found

    def entries(self) -> list[list]:
        return [entry for heap in self.groups.values() for entry in heap if entry[-1] is not None]


class WorkQueue:
    def __init__(self, aging_per_second: float, policy: str = "fair"):
        if policy not in POLICIES:
            raise ValueError(f"unknown scheduling policy {policy!r}; one of {', '.join(POLICIES)}")
        self.aging_per_second = aging_per_second
        self.policy = policy
        self.cond = threading.Condition()  # guards the lanes, task states and `closed`
        self._lanes: dict[tuple, OwnerHeads] = {}  # forward key -> its waiting images by group
        self._order = itertools.count()
        self.closed = False

    def put(self, task: DenoiseTask) -> None:
        with self.cond:
            task.mark_queued()
            task.rank = self.aging_per_second * task.submitted_at - task.priority
            entry = [task.rank, task.submitted_at, next(self._order), task]
            task.queue_entry = entry
            self._push(task.spec.forward_key(), entry)
            self.cond.notify_all()

    def _push(self, key: tuple, entry: list) -> None:
        self._lanes.setdefault(key, OwnerHeads()).push(entry)

    def withdraw(self, task: DenoiseTask, to_state: str) -> bool:
        """Take a still-queued task out (to `parked` or `done`); False if a worker has it."""
        with self.cond:
            if task.state != QUEUED:
                return False
            self._blank(task)
            task.state = to_state
            return True

    def _blank(self, task: DenoiseTask) -> None:
        if task.queue_entry is not None:
            self._lanes[task.spec.forward_key()].blank(task.queue_entry)
            task.queue_entry = None

    def _top(self, key: tuple) -> list | None:
        lane = self._lanes.get(key)
        top = lane.top() if lane is not None else None
        return top[0] if top is not None else None

    def peek(self, key: tuple) -> DenoiseTask | None:
        """The most urgent task of `key` by rank, left in place. Call with `cond` held."""
        top = self._top(key)
        return top[-1] if top is not None else None

    def best_key(self) -> tuple | None:
        """The forward key of the most urgent task overall. Call with `cond` held."""
        best = None
        for key in list(self._lanes):
            top = self._top(key)
            if top is None:
                if not self._lanes[key].groups:
                    del self._lanes[key]
            elif best is None or top[:3] < best[1][:3]:
                best = (key, top)
        return best[0] if best else None

    def outranked(self, key: tuple) -> bool:
        """True when another key's best task is more urgent than `key`'s. Call with `cond` held."""
        best = self.best_key()
        return best is not None and best != key

    def count(self, key: tuple) -> int:
        with self.cond:
            lane = self._lanes.get(key)
            return lane.live if lane is not None else 0

    def _choose(self, lane: OwnerHeads, in_flight: dict):
        """The policy, in one place: which group's head goes next (None: nothing waits).

        fifo: the most urgent head. fair: among heads of that head's priority, the group with the fewest
        images in flight, then the most urgent: the best idle group of that priority, or one of the groups
        counted in `in_flight`."""
        top = lane.top()
        if top is None:
            return None
        best, level = top
        if self.policy == "fifo":
            return best[-1].share_group
        candidates = []
        for group, count in in_flight.items():
            head = lane.head(group) if count != 0 and group in lane.groups else None
            if head is not None and head[-1].priority == level:
                candidates.append((count, tuple(head[:3]), group))
        idle = lane.first_idle(level, in_flight)
        if idle is not None:
            candidates.append((0, idle[:3], idle[4]))
        return min(candidates, key=lambda candidate: candidate[:2])[2]

    def _in_order(self, key: tuple, in_flight: dict, popped: list[list]):
        """`key`'s tasks in admission order, each popped (and listed in `popped`) as it is yielded.
        The caller pushes back whatever it does not keep."""
        lane = self._lanes.get(key)
        if lane is None:
            return
        counts = dict(in_flight)
        while True:
            group = self._choose(lane, counts)
            if group is None:
                return
            entry = lane.pop(group)
            popped.append(entry)
            counts[group] = counts.get(group, 0) + 1
            yield entry[-1]

    def take(self, key: tuple, limit: int, accept: Callable[[DenoiseTask], bool],
             in_flight: dict | None = None) -> list[DenoiseTask]:
        """Up to `limit` tasks of `key` that `accept` admits, in the policy's order; `in_flight`:
        group -> images it has on the device now. Call with `cond` held."""
        taken: list[DenoiseTask] = []
        popped: list[list] = []
        if limit > 0:
            for task in self._in_order(key, in_flight or {}, popped):
                if accept(task):
                    task.queue_entry = None
                    taken.append(task)
                    if len(taken) >= limit:
                        break
        for entry in popped:
            if entry[-1] is not None and entry[-1].queue_entry is entry:
                self._push(key, entry)
        return taken

    def preview(self, key: tuple, limit: int, in_flight: dict | None = None) -> list[DenoiseTask]:
        """The first `limit` tasks `take` would offer, left in place. Call with `cond` held."""
        popped: list[list] = []
        order = self._in_order(key, in_flight or {}, popped)
        tasks = [task for task, _ in zip(order, range(limit))]
        for entry in popped:
            self._push(key, entry)
        return tasks

    def pending(self) -> int:
        with self.cond:
            return sum(lane.live for lane in self._lanes.values())

    def drain(self) -> list[DenoiseTask]:
        """Close the queue and hand back everything still waiting."""
        with self.cond:
            self.closed = True
            return self.take_all()

    def take_all(self) -> list[DenoiseTask]:
        """Everything still waiting, ended (DONE) and handed back; the queue stays open."""
        with self.cond:
            left = [entry[-1] for lane in self._lanes.values() for entry in lane.entries()]
            self._lanes.clear()
            for task in left:
                task.queue_entry = None
                task.state = DONE
            self.cond.notify_all()
            return left
