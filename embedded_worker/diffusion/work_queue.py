"""WorkQueue: images waiting for a device, in priority order, grouped by what can share a forward.

Design notes
- Priority 1-10, higher first, FIFO within a priority (by when the request
  was accepted), and aging: a task gains `aging_per_second` points while it
  waits. Every task ages at the same rate, so "priority + rate x waited"
  orders tasks exactly as the fixed key "rate x submitted_at - priority"
  does: a heap keyed once stays correct forever, with no re-sorting.
- One heap per forward key (model, size, guidance mode), because a device
  worker fills its next forward from one key at a time.
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


class WorkQueue:
    def __init__(self, aging_per_second: float):
        self.aging_per_second = aging_per_second
        self.cond = threading.Condition()  # guards the heaps, task states and `closed`
        self._heaps: dict[tuple, list[list]] = {}
        self._order = itertools.count()
        self.closed = False

    def put(self, task: DenoiseTask) -> None:
        with self.cond:
            task.mark_queued()
            rank = self.aging_per_second * task.submitted_at - task.priority
            entry = [rank, task.submitted_at, next(self._order), task]
            task.queue_entry = entry
            heapq.heappush(self._heaps.setdefault(task.spec.forward_key(), []), entry)
            self.cond.notify_all()

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

    def _top(self, key: tuple) -> list | None:
        heap = self._heaps.get(key)
        while heap and heap[0][-1] is None:
            heapq.heappop(heap)
        return heap[0] if heap else None

    def peek(self, key: tuple) -> DenoiseTask | None:
        """The most urgent task of `key`, left in place. Call with `cond` held."""
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
            return sum(1 for entry in self._heaps.get(key, ()) if entry[-1] is not None)

    def take(self, key: tuple, limit: int, accept: Callable[[DenoiseTask], bool]) -> list[DenoiseTask]:
        """Up to `limit` most urgent tasks of `key` that `accept` admits. Call with `cond` held."""
        heap = self._heaps.get(key, [])
        taken: list[DenoiseTask] = []
        refused: list[list] = []
        while heap and len(taken) < limit:
            entry = heapq.heappop(heap)
            task = entry[-1]
            if task is None:
                continue
            if accept(task):
                task.queue_entry = None
                taken.append(task)
            else:
                refused.append(entry)
        for entry in refused:
            heapq.heappush(heap, entry)
        return taken

    def pending(self) -> int:
        with self.cond:
            return sum(1 for heap in self._heaps.values() for entry in heap if entry[-1] is not None)

    def drain(self) -> list[DenoiseTask]:
        """Close the queue and hand back everything still waiting."""
        with self.cond:
            self.closed = True
            left = [entry[-1] for heap in self._heaps.values() for entry in heap if entry[-1] is not None]
            self._heaps.clear()
            for task in left:
                task.queue_entry = None
                task.state = DONE
            self.cond.notify_all()
            return left

