"""BatchService: many items through one workflow, none lost, each reproducible alone.

Design notes
- Every item is its own record and its own WorkflowRun with its own seed, so
  any item can be re-run alone and a failure stays with its item. The device
  coalesces the items' images into shared forwards (up to the batch's
  `max_batch_size` at once, `preferred_batch_size` when dynamic sizing is
  off), sized by memory and shrunk on out-of-memory without losing any.
- A batch ends `completed` only when every item completed. Otherwise it ends
  `failed` and says which items failed and why; `retry` re-runs exactly
  those. The bare request the existing C# client sends (no items) becomes
  `total_images` items with seeds seed + i.
- Metrics come from what ran: a "batch" in BatchMetrics is a group of images
  that started denoising together in one cohort.
"""

from __future__ import annotations

import logging
import random
import threading
import time
import uuid
from typing import TYPE_CHECKING, Callable

from .diffusion.task import BatchSizing
from .errors import InvalidRequest, InvalidState, NotFound, WorkerError
from .progress_board import state_code
from .protocol import (
    BatchConfiguration,
    ControlBatchRequest,
    DeleteBatchRequest,
    ExecuteBatchRequest,
    iso,
    ok,
)
from .record_owner import RecordOwner
from .recovery import suspect_check
from .runner import WorkflowRun
from .state import (
    ADDED,
    CANCELLED,
    CHANGED,
    COMPLETED,
    FAILED,
    FINAL,
    PAUSED,
    PENDING,
    REMOVED,
    RUNNING,
    BatchRecord,
    ItemRecord,
    Record,
)

if TYPE_CHECKING:
    from .engine import Engine

PAUSE_WAIT_SECONDS = 30.0  # one step boundary away; a loaded machine may take seconds to reach it
BOARD_INTERVAL_SECONDS = 0.05
log = logging.getLogger("embedded_worker.batches")


class BatchService:
    def __init__(self, engine: "Engine"):
        self.engine = engine
        self._runs: dict[str, WorkflowRun] = {}  # item record id -> run; guarded by engine.book.lock
        self._plans: dict[str, object] = {}
        self._adjustments: dict[str, int] = {}
        self._published: dict[str, float] = {}
        self._observers: dict[str, list[Callable[[dict], None]]] = {}
        self._lock = threading.Lock()  # guards `_adjustments`, `_published` and `_observers`
        self._control = threading.RLock()  # one control or delete at a time: a delete never meets a retry halfway
        engine.book.listeners.append(self._record_event)

    # ---- commands --------------------------------------------------------------------------

    def execute(self, request: ExecuteBatchRequest) -> dict:
        engine = self.engine
        engine.ensure_open()
        batch_id = request.batch_id or str(uuid.uuid4())
        existing = self._find(batch_id)
        if existing is None:
            existing = self._create(batch_id, request)
            duplicate = False
        else:
            duplicate = True
        if not request.background:
            engine.wait_final(existing)
        reply = self.describe(existing, include_items=False)
        reply["duplicate"] = duplicate
        return reply

    def _create(self, batch_id: str, request: ExecuteBatchRequest) -> BatchRecord:
        engine = self.engine
        workflow = engine.workflows.take_for_run(request.workflow_id)
        parameters = dict(request.parameters)
        total = parameters.pop("total_images", None)
        configuration = request.configuration or BatchConfiguration(total_images=total or 1)
        items = self._item_parameters(request, parameters, total or configuration.total_images)
        plans = [
            engine.planner.for_workflow(
                workflow, values, prefix=f"items.{index}.parameters." if request.items else "parameters."
            )
            for index, (_, values) in enumerate(items)
        ]
        for model_id in {plan.model_id for plan in plans}:
            engine.native_size(model_id)  # may wait for a first model build: not under the lock
        parallel = {"requested": 1, "added": [], "refused": []}
        if configuration.parallel_processing and configuration.max_parallel_batches > 1:
            parallel = {"requested": configuration.max_parallel_batches,
                        **engine.pool.ensure_parallel(configuration.max_parallel_batches, plans[0].model_id)}
        record = BatchRecord(
            id=batch_id,
            priority=request.priority,
            workflow_id=workflow.id,
            name=request.name or f"{workflow.id} x{len(items)}",
            request=request.model_dump(mode="json", exclude_none=True),
            configuration=configuration.model_dump(),
            parallel=parallel,
        )
        sizing = BatchSizing.for_configuration(batch_id, configuration)
        with engine.book.lock:
            existing = engine.book.batches.get(batch_id)
            if existing is not None:
                return existing
            engine.check_capacity(len(items))  # checked and taken under one lock: concurrent submits never pass it
            engine.book.require_free_id(record, [f"{batch_id}/{item_id}" for item_id, _ in items])
            engine.book.add(record)
            log.info("Batch '%s' accepted: %d item(s) of %s", batch_id, len(items), workflow.id)
            runs = []
            for index, ((item_id, values), plan) in enumerate(zip(items, plans)):
                item = ItemRecord(id=f"{batch_id}/{item_id}", priority=request.priority, batch_id=batch_id,
                                  item_id=item_id, index=index, parameters=values, seed=values.get("seed"))
                record.item_ids.append(item.id)
                engine.book.add(item)
                self._plans[item.id] = plan
                runs.append(self._new_run(item, plan, sizing))
            engine.book.transition(record, PENDING)
            for item, _ in runs:
                engine.book.transition(item, PENDING)
        for _, run in runs:
            run.start()
        return record

    def _item_parameters(self, request: ExecuteBatchRequest, parameters: dict, total: int) -> list[tuple[str, dict]]:
        limit = self.engine.config.limits.max_items
        count = len(request.items) if request.items else total
        if not isinstance(count, int) or isinstance(count, bool) or count < 1:
            raise InvalidRequest(f"parameters.total_images: must be a positive integer, got {count!r}")
        if count > limit:
            field = "items" if request.items else "parameters.total_images"
            raise InvalidRequest(f"{field}: {count} items exceed the limit of {limit}")
        if request.items:
            ids = [item.item_id or f"item-{i:04d}" for i, item in enumerate(request.items)]
            if len(set(ids)) != len(ids):
                raise InvalidRequest("items: item_id values must be unique within a batch")
            return [(item_id, {**parameters, **item.parameters}) for item_id, item in zip(ids, request.items)]
        seed = parameters.get("seed")
        if seed is None:
            seed = random.SystemRandom().randrange(2**32)
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise InvalidRequest(f"parameters.seed: must be an integer, got {seed!r}")
        return [(f"item-{i:04d}", {**parameters, "seed": seed + i}) for i in range(count)]

    def _new_run(self, item: ItemRecord, plan, sizing: BatchSizing,
                 isolated: bool = False) -> tuple[ItemRecord, WorkflowRun]:
        engine = self.engine
        owner = RecordOwner(engine.book, engine.outputs, item, item.batch_id,
                            on_progress=self._item_progress)
        run = WorkflowRun(plan, owner, engine.pool, engine.cpu, item.priority, engine.native_size, sizing, isolated)
        self._runs[item.id] = run
        return item, run

    def recover(self, record: BatchRecord, items: list[ItemRecord]) -> dict:
        """A batch the last process left unfinished: its unfinished items requeued, kept paused, failed or
        quarantined; a suspect (running when the process died) runs alone so a second death names it."""
        engine, book = self.engine, self.engine.book
        outcome = {"requeued": 0, "paused": 0, "failed": 0, "quarantined": 0}
        try:
            workflow = engine.workflows.take_for_run(record.workflow_id)
        except WorkerError as error:
            workflow, reason = None, f"cannot resume after a restart: {error.message}"
        if engine.config.recovery == "fail":
            workflow, reason = None, "the worker restarted before this item finished"
        sizing = BatchSizing.for_configuration(record.id, BatchConfiguration.model_validate(record.configuration))
        runs = []
        with book.lock:
            for item in (i for i in items if i.status not in FINAL):
                quarantine = suspect_check(item)
                if workflow is None or quarantine is not None:
                    book.transition(item, FAILED, quarantine or reason,
                                    {"error_code": "internal" if quarantine else "unavailable"})
                    outcome["quarantined" if quarantine else "failed"] += 1
                    continue
                try:
                    plan = engine.planner.for_workflow(workflow, item.parameters)
                    engine.native_size(plan.model_id)
                except WorkerError as error:
                    book.transition(item, FAILED, f"cannot resume after a restart: {error.message}",
                                    {"error_code": error.code})
                    outcome["failed"] += 1
                    continue
                paused = item.status == PAUSED
                book.requeue_after_restart(item)
                self._plans[item.id] = plan
                item_run = self._new_run(item, plan, sizing, isolated=item.recoveries > 0)[1]
                runs.append((item_run, paused))
                outcome["paused" if paused else "requeued"] += 1
            book.requeue_after_restart(record)
            if all(i.status in FINAL for i in items):
                self._finish(record, items)
        for item_run, paused in runs:
            item_run.start(paused=paused)
        return outcome

    def status(self, batch_id: str, include_items: bool) -> dict:
        return self.describe(self._record(batch_id), include_items)

    def runs_of(self, batch_id: str) -> tuple[BatchRecord, list[WorkflowRun]]:
        """A batch and the runs doing its items' work."""
        record = self._record(batch_id)
        with self.engine.book.lock:
            runs = [self._runs.get(item_id) for item_id in record.item_ids]
        return record, [run for run in runs if run is not None]

    def current_metrics(self) -> dict:
        """The batch manager's figures now, summed over every batch it holds: what `metrics` says of one."""
        with self.engine.book.lock:
            records = list(self.engine.book.batches.values())
        per_batch = [self.describe(record, include_items=False) for record in records]
        metrics = [reply["metrics"] for reply in per_batch]
        completed = sum(m["completed_batches"] for m in metrics)
        timed = sum(m["average_batch_time"] * m["completed_batches"] for m in metrics)
        statuses: dict[str, int] = {}
        for reply in per_batch:
            statuses[reply["status"]] = statuses.get(reply["status"], 0) + 1
        return {
            "batches": len(records),
            "batches_by_status": statuses,
            "items": sum(reply["total_items"] for reply in per_batch),
            "processed_items": sum(reply["processed_items"] for reply in per_batch),
            "failed_items": sum(reply["failed_items"] for reply in per_batch),
            "running_items": sum(reply["running_items"] for reply in per_batch),
            "total_batches": sum(m["total_batches"] for m in metrics),
            "completed_batches": completed,
            "failed_batches": sum(m["failed_batches"] for m in metrics),
            "total_images_generated": sum(m["total_images_generated"] for m in metrics),
            "average_batch_time": round(timed / completed, 4) if completed else 0.0,
            "memory_usage_peak": max((m.peak_used for m in self.engine.pool.monitors.values()), default=0),
            "dynamic_adjustments": sum(m["dynamic_adjustments"] for m in metrics),
        }

    def control(self, request: ControlBatchRequest) -> dict:
        book = self.engine.book
        verb = request.action
        with self._control:
            record = self._record(request.batch_id)
            items = self._items(record)
            if verb == "pause":
                if record.status not in (PENDING, RUNNING):
                    raise InvalidState(f"{record.label()} cannot pause in current status: {record.status}")
                for item in items:
                    if item.status in (PENDING, RUNNING) and item.id in self._runs:
                        self._runs[item.id].pause()
            elif verb == "resume":
                book.require(record, PENDING, "resume")
                for item in items:
                    if item.id in self._runs and book.transition(item, PENDING):
                        self._runs[item.id].resume()
            elif verb == "cancel":
                book.require(record, CANCELLED, "cancel")
                self._cancel_items(items)
            else:
                self._retry(record, items)
        if verb == "pause":  # outside the lock: other controls may come while the step boundary nears
            book.wait_until(lambda: record.status not in (PENDING, RUNNING), PAUSE_WAIT_SECONDS)
        reply = self.describe(record, request.include_items)
        reply["action"] = verb
        return reply

    def _retry(self, record: BatchRecord, items: list[ItemRecord]) -> None:
        engine = self.engine
        failed = [item for item in items if item.status == FAILED]
        if not failed:
            raise InvalidState(f"{record.label()} has no failed items to retry (status: {record.status})")
        sizing = BatchSizing.for_configuration(record.id, BatchConfiguration.model_validate(record.configuration))
        with engine.book.lock:
            if record.status in FINAL:
                engine.book.begin_attempt(record)
            runs = []
            for item in failed:
                engine.book.begin_attempt(item)
                engine.outputs.release(record.id, item_id=item.item_id)
                item.outputs = []
                plan = self._plans[item.id]
                runs.append(self._new_run(item, plan, sizing))
        for _, run in runs:
            run.start()

    def _cancel_items(self, items: list[ItemRecord]) -> None:
        for item in items:
            if self.engine.book.transition(item, CANCELLED):
                run = self._runs.get(item.id)
                if run is not None:
                    run.cancel()

    def delete(self, request: DeleteBatchRequest) -> dict:
        with self._control:
            return self._delete(request)

    def _delete(self, request: DeleteBatchRequest) -> dict:
        engine = self.engine
        record = self._record(request.batch_id)
        items = self._items(record)
        if record.status not in FINAL:
            engine.book.transition(record, CANCELLED)
        self._cancel_items(items)
        released = engine.outputs.release(record.id, delete_files=request.force_cleanup)
        with engine.book.lock:
            for item in items:
                engine.book.remove(item)
                self._runs.pop(item.id, None)
                self._plans.pop(item.id, None)
            engine.book.remove(record)
        with self._lock:
            self._adjustments.pop(record.id, None)
            self._observers.pop(record.id, None)
            self._published.pop(record.id, None)
        return ok(batch_id=record.id, deleted=True, released_outputs=len(released))

    def cancel_all(self) -> None:
        with self.engine.book.lock:
            batches = [r for r in self.engine.book.batches.values() if r.status not in FINAL]
        for record in batches:
            self.engine.book.transition(record, CANCELLED, "the worker closed")
            self._cancel_items(self._items(record))

    def resized(self, groups: set, size: int, reason: str) -> None:
        """Count a size change for each batch that had images in flight; a coordination step's own sizing
        group is no batch here, and counting it would keep an entry nobody deletes."""
        with self.engine.book.lock:
            batches = {group for group in groups if group in self.engine.book.batches}
        with self._lock:
            for group in batches:
                self._adjustments[group] = self._adjustments.get(group, 0) + 1

    # ---- the batch follows its items; the board follows the batch ---------------------------------

    def _record_event(self, record: Record, event: str) -> None:
        if record.kind == "item" and event == CHANGED:
            self._item_changed(record)
        elif record.kind == "batch":
            board = self.engine.board
            if event == ADDED:
                record.board_slot = board.claim("batch", record.id)
            elif event == REMOVED:
                board.release(record.id)
            else:
                self._publish(record)

    def _item_progress(self, item: Record, run: WorkflowRun) -> None:
        """Denoising progress of an item: republish its batch, at most every BOARD_INTERVAL."""
        now = time.monotonic()
        with self._lock:
            if now - self._published.get(item.batch_id, 0.0) < BOARD_INTERVAL_SECONDS:
                return
            self._published[item.batch_id] = now
        record = self._find(item.batch_id)
        if record is not None:
            self._publish(record)

    def _publish(self, record: BatchRecord) -> None:
        """The batch's figures to the board and to every tracker of it."""
        figures = self.figures(record, self._items(record))
        if record.board_slot >= 0:
            self.engine.board.publish(record.board_slot, {
                "state": state_code(record.status),
                "progress_bp": int(100 * figures["progress"]),
                "items_done": figures["processed_items"],
                "items_failed": figures["failed_items"],
                "items_total": figures["total_items"],
                "eta_ms": -1 if figures["eta_seconds"] is None else int(1000 * figures["eta_seconds"]),
                "attempt": record.attempt,
            })
        with self._lock:
            observers = list(self._observers.get(record.id, ()))
        for observer in observers:  # on the CPU pool: a slow callback must not hold up the device
            self.engine.cpu.submit(observer, dict(figures))

    def observe(self, batch_id: str, observer: Callable[[dict], None]) -> Callable[[], None]:
        """Call `observer(figures)` after every change of the batch; returns the way to stop."""
        record = self._record(batch_id)
        with self._lock:
            self._observers.setdefault(batch_id, []).append(observer)

        def stop() -> None:
            with self._lock:
                if observer in self._observers.get(batch_id, []):
                    self._observers[batch_id].remove(observer)

        self.engine.cpu.submit(observer, self.figures(record, self._items(record)))
        return stop

    def figures(self, record: BatchRecord, items: list[ItemRecord]) -> dict:
        """Counts, progress (0-100), pace and ETA: what the status reply, the board and trackers show."""
        statuses = [i.status for i in items]
        runs = [self._runs.get(i.id) for i in items]
        progress = sum(1.0 if i.status == COMPLETED else (r.progress if r else 0.0) for i, r in zip(items, runs))
        done = statuses.count(COMPLETED)
        remaining = sum(1 for status in statuses if status not in FINAL)
        now = time.time()
        elapsed = ((record.completed_at or now) - record.started_at) if record.started_at else 0.0
        pace = done / elapsed if done and elapsed > 0 else 0.0
        if record.status in FINAL or not remaining:
            eta = 0.0
        elif pace > 0:
            eta = remaining / pace
        else:
            running = [r.eta_seconds for r, i in zip(runs, items) if r and i.status == RUNNING and r.eta_seconds]
            waves = remaining / max(1, statuses.count(RUNNING))
            eta = max(running) * waves if running else None
        return {
            "batch_id": record.id,
            "status": record.status,
            "total_items": len(items),
            "processed_items": done,
            "failed_items": statuses.count(FAILED),
            "cancelled_items": statuses.count(CANCELLED),
            "pending_items": statuses.count(PENDING) + statuses.count(PAUSED),
            "running_items": statuses.count(RUNNING),
            "current_batch_size": statuses.count(RUNNING),
            "progress": 100 * progress / max(1, len(items)),
            "images_per_second": pace,
            "eta_seconds": eta,
        }

    def _item_changed(self, item: Record) -> None:
        book = self.engine.book
        with book.lock:
            record = book.batches.get(item.batch_id)
            if record is None or record.status in FINAL:
                return
            items = self._items(record)
            statuses = [i.status for i in items]
            if item.status == RUNNING and record.status == PENDING:
                book.transition(record, RUNNING)
            elif all(s in FINAL for s in statuses):
                self._finish(record, items)
            elif record.status in (PENDING, RUNNING) and all(s in FINAL or s == PAUSED for s in statuses):
                book.transition(record, PAUSED)
            else:
                self._publish(record)

    def _finish(self, record: BatchRecord, items: list[ItemRecord]) -> None:
        book = self.engine.book
        if record.status == PAUSED:
            book.transition(record, PENDING)
        if record.status == PENDING:
            book.transition(record, RUNNING)
        failed = [i for i in items if i.status == FAILED]
        cancelled = [i for i in items if i.status == CANCELLED]
        if not failed and not cancelled:
            book.transition(record, COMPLETED)
        elif failed:
            details = [{"item_id": i.item_id, "error": i.error,
                        "error_code": (i.error_details or {}).get("error_code")} for i in failed]
            book.transition(record, FAILED, f"{len(failed)} of {len(items)} items failed", details)
        else:
            book.transition(record, CANCELLED)

    # ---- replies ---------------------------------------------------------------------------

    def _find(self, batch_id: str) -> BatchRecord | None:
        with self.engine.book.lock:
            return self.engine.book.batches.get(batch_id)

    def _record(self, batch_id: str) -> BatchRecord:
        record = self._find(batch_id)
        if record is None:
            raise NotFound(f"Batch '{batch_id}' not found")
        return record

    def _items(self, record: BatchRecord) -> list[ItemRecord]:
        with self.engine.book.lock:
            return [self.engine.book.items[i] for i in record.item_ids if i in self.engine.book.items]

    def describe(self, record: BatchRecord, include_items: bool) -> dict:
        items = self._items(record)
        figures = self.figures(record, items)
        reply = ok(
            **figures,
            name=record.name,
            workflow_id=record.workflow_id,
            priority=record.priority,
            attempt=record.attempt,
            created_at=iso(record.created_at),
            started_at=iso(record.started_at),
            completed_at=iso(record.completed_at),
            error=record.error,
            outputs=[ref for item in items for ref in item.outputs],
            metrics=self._metrics(record, [self._runs.get(i.id) for i in items]),
            configuration=dict(record.configuration),
            parallel=dict(record.parallel),
            board_slot=record.board_slot,
        )
        reply["progress"] = int(figures["progress"])
        if record.error_details is not None:
            reply["failed"] = record.error_details
        if include_items:
            reply["items"] = [self._item_state(i) for i in items]
        return reply

    def _metrics(self, record: BatchRecord, runs: list[WorkflowRun | None]) -> dict:
        tasks = [t for r in runs if r is not None for t in r.all_tasks]
        cohorts: dict[int, list] = {}
        for task in tasks:
            if task.cohort_id is not None:
                cohorts.setdefault(task.cohort_id, []).append(task)
        completed, failed, durations = 0, 0, []
        for members in cohorts.values():
            if not all(t.future.done() for t in members):
                continue
            if any(t.future.cancelled() or t.future.exception() is not None for t in members):
                failed += 1
                continue
            completed += 1
            started = min(t.run_started_at for t in members if t.run_started_at is not None)
            durations.append(max(t.finished_at for t in members) - started)
        monitors = self.engine.pool.monitors.values()
        with self._lock:
            adjustments = self._adjustments.get(record.id, 0)
        return {
            "total_batches": len(cohorts),
            "completed_batches": completed,
            "failed_batches": failed,
            "total_images_generated": sum(1 for t in tasks if t.future.done() and not t.future.cancelled()
                                          and t.future.exception() is None),
            "average_batch_time": round(sum(durations) / len(durations), 4) if durations else 0.0,
            "memory_usage_peak": max((m.peak_used for m in monitors), default=0),
            "dynamic_adjustments": adjustments,
        }

    def _item_state(self, item: ItemRecord) -> dict:
        run = self._runs.get(item.id)
        state = {
            "item_id": item.item_id,
            "index": item.index,
            "status": item.status,
            "seed": item.seed,
            "attempt": item.attempt,
            "progress": int(100 * (1.0 if item.status == COMPLETED else (run.progress if run else 0.0))),
            "error": item.error,
            "outputs": list(item.outputs),
            "started_at": iso(item.started_at),
            "completed_at": iso(item.completed_at),
        }
        if item.error_details:
            state["error_code"] = item.error_details.get("error_code")
        return state

