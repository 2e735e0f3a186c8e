"""WorkQueue: images waiting for a device, in priority order, grouped by what can share a forward.

Design notes
- Priority 1-10, higher first, and aging: a task gains `aging_per_second`
  points while it waits. Every task ages at the same rate, so "priority +
  rate x waited" orders tasks exactly as the fixed key "rate x submitted_at -
  priority" does (`rank`, lower first): keyed once, correct forever.
- Within one priority the policy decides (`scheduling.policy`):
  `fifo`: by when the request was accepted, so a 1000-item batch goes
  before a session that came a moment later. `fair`: between owners (a
  batch, or the request that made a session's images), by images in flight:
  the owner with the fewest on the device (counting what this admission
  already took) goes next, deficit round-robin by images. Across priorities
  the aged rank decides in both policies.
- One heap per (forward key, owner): a device worker fills its next forward
  from one key at a time, and each owner's own order is its rank order, so
  choosing between owners only looks at their heads.
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

from .task import DONE, QUEUED, DenoiseTask


POLICIES = ("fair", "fifo")


class WorkQueue:
    def __init__(self, aging_per_second: float, policy: str = "fair"):
        if policy not in POLICIES:
            raise ValueError(f"unknown scheduling policy {policy!r}; one of {', '.join(POLICIES)}")
        self.aging_per_second = aging_per_second
        self.policy = policy
        self.cond = threading.Condition()  # guards the heaps, task states and `closed`
        self._heaps: dict[tuple, dict[object, list[list]]] = {}  # forward key -> owner -> rank-ordered heap
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
        heapq.heappush(self._heaps.setdefault(key, {}).setdefault(entry[-1].owner, []), entry)

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
            task.queue_entry[-1] = None
            task.queue_entry = None

    def _heads(self, key: tuple) -> list[tuple[object, list]]:
        """(owner, its most urgent live entry) for every owner with tasks of `key`."""
        owners = self._heaps.get(key, {})
        heads = []
        for owner in list(owners):
            heap = owners[owner]
            while heap and heap[0][-1] is None:
                heapq.heappop(heap)
            if heap:
                heads.append((owner, heap[0]))
            else:
                del owners[owner]
        return heads

    def _top(self, key: tuple) -> list | None:
        heads = self._heads(key)
        return min((entry for _, entry in heads), key=lambda e: e[:3]) if heads else None

    def peek(self, key: tuple) -> DenoiseTask | None:
        """The most urgent task of `key` by rank, left in place. Call with `cond` held."""
        top = self._top(key)
        return top[-1] if top is not None else None

    def best_key(self) -> tuple | None:
        """The forward key of the most urgent task overall. Call with `cond` held."""
        best = None
        for key in list(self._heaps):
            top = self._top(key)
            if top is not None and (best is None or top[:3] < best[1][:3]):
                best = (key, top)
        return best[0] if best else None

    def outranked(self, key: tuple) -> bool:
        """True when another key's best task is more urgent than `key`'s. Call with `cond` held."""
        best = self.best_key()
        return best is not None and best != key

    def count(self, key: tuple) -> int:
        with self.cond:
            return sum(1 for heap in self._heaps.get(key, {}).values() for entry in heap if entry[-1] is not None)

    def _choose(self, heads: list[tuple[object, list]], in_flight: dict) -> tuple[object, list]:
        """The policy, in one place: which owner's head goes next."""
        best = min(heads, key=lambda head: head[1][:3])
        if self.policy == "fifo":
            return best
        level = best[1][-1].priority
        peers = [head for head in heads if head[1][-1].priority == level]
        return min(peers, key=lambda head: (in_flight.get(head[0], 0), head[1][:3]))

    def _in_order(self, key: tuple, in_flight: dict, popped: list[list]):
        """`key`'s tasks in admission order, each popped (and listed in `popped`) as it is yielded.
        The caller pushes back whatever it does not keep."""
        counts = dict(in_flight)
        while True:
            heads = self._heads(key)
            if not heads:
                return
            owner, entry = self._choose(heads, counts)
            heapq.heappop(self._heaps[key][owner])
            popped.append(entry)
            counts[owner] = counts.get(owner, 0) + 1
            yield entry[-1]

    def take(self, key: tuple, limit: int, accept: Callable[[DenoiseTask], bool],
             in_flight: dict | None = None) -> list[DenoiseTask]:
        """Up to `limit` tasks of `key` that `accept` admits, in the policy's order; `in_flight`:
        owner -> images it has on the device now. Call with `cond` held."""
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
            return sum(1 for owners in self._heaps.values() for heap in owners.values()
                       for entry in heap if entry[-1] is not None)

    def drain(self) -> list[DenoiseTask]:
        """Close the queue and hand back everything still waiting."""
        with self.cond:
            self.closed = True
            left = [entry[-1] for owners in self._heaps.values() for heap in owners.values()
                    for entry in heap if entry[-1] is not None]
            self._heaps.clear()
            for task in left:
                task.queue_entry = None
                task.state = DONE
            self.cond.notify_all()
            return left
