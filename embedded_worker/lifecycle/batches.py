"""BatchService: many items through one workflow, none lost, each reproducible alone.

Design notes
- Every item is a job of its own (`jobs.JobService`) with its own seed, so
  any item can be re-run alone and a failure stays with its item. The device
  coalesces the items' images into shared forwards (up to the batch's
  `max_batch_size` at once, `preferred_batch_size` when dynamic sizing is
  off), sized by memory and shrunk on out-of-memory without losing any.
- The batch itself is a view (`batch_view`): its status, times, counts,
  progress and ETA are derived from its items. Batch controls fan out to
  the items through the job service, in one message to the lifecycle loop.
- A batch ends `completed` only when every item completed. Otherwise it ends
  `failed` and says which items failed and why; `retry` re-runs exactly
  those. The bare request the existing C# client sends (no items) becomes
  `total_images` items with seeds seed + i.
- A new batch and its items are on disk, in one write, before they are
  accepted: a batch the store cannot take (a full disk) is refused whole.
- A coordination's `inference.batch_process` step makes a batch too, by the
  same path (`prepare`, then `start_child` on the loop), named as the
  session's child (`session_id`); `child_batch` is how the session waits.
- Metrics come from what ran: a "batch" in BatchMetrics is a group of images
  that started denoising together in one cohort.
"""

from __future__ import annotations

import logging
import random
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..api import field_names
from ..api.messages import BatchConfiguration, iso, ok, parse
from ..diffusion.task import BatchSizing
from ..errors import InvalidRequest, InvalidState, NotFound, WorkerError
from . import batch_view
from .launched_steps import resumed_from_step
from .state import COMPLETED, FAILED, FINAL, PAUSED, PENDING, RUNNING, BatchRecord, ItemRecord, WorkState

if TYPE_CHECKING:
    from ..api.messages import ControlBatchRequest, DeleteBatchRequest, ExecuteBatchRequest
    from ..diffusion.device_pool import DevicePool
    from ..outputs.store import OutputStore
    from ..workflows.catalog import WorkflowCatalog
    from .acceptance import Acceptance
    from .jobs import Job, JobService
    from .loop import LifecycleLoop
    from .planning import Planner, RunPlan
    from .run import WorkflowRun
    from .state import StateBook
    from .store import StateStore

PAUSE_WAIT_SECONDS = 30.0  # one step boundary away; a loaded machine may take seconds to reach it
log = logging.getLogger("embedded_worker.batches")


@dataclass
class PreparedBatch:
    """A batch request planned off the loop, its records not yet in the book."""

    record: BatchRecord
    members: list[ItemRecord]
    plans: list[RunPlan]
    sizing: BatchSizing


class BatchService:
    def __init__(self, book: StateBook, loop: LifecycleLoop, store: StateStore, jobs: JobService,
                 acceptance: Acceptance, planner: Planner, workflows: WorkflowCatalog, outputs: OutputStore,
                 pool: DevicePool):
        self.book = book
        self.loop = loop
        self.store = store
        self.jobs = jobs
        self.acceptance = acceptance
        self.planner = planner
        self.workflows = workflows
        self.outputs = outputs
        self.pool = pool

    # ---- commands --------------------------------------------------------------------------

    def execute(self, request: ExecuteBatchRequest) -> dict:
        self.acceptance.ensure_open()
        batch_id = request.batch_id or str(uuid.uuid4())
        existing = self._find(batch_id)
        record = self.loop.call(self._accept, self.prepare(batch_id, request)) if existing is None else existing
        if not request.background:
            self.acceptance.wait_final(record, lambda: batch_view.status(self.items(record)) in FINAL)
        reply = self.describe(record, include_items=False)
        reply["duplicate"] = existing is not None
        return reply

    def prepare(self, batch_id: str, request: ExecuteBatchRequest, session_id: str | None = None) -> PreparedBatch:
        """Off the loop (it may build a model, or add device workers for `parallel_processing`)."""
        workflow = self.workflows.take_for_run(request.workflow_id)
        parameters = dict(request.parameters)
        total = parameters.pop("total_images", None)
        configuration = request.configuration or BatchConfiguration(total_images=total or 1)
        items = self._item_parameters(request, parameters, total or configuration.total_images)
        plans = [
            self.planner.for_workflow(workflow, values, prefix=f"items.{index}.parameters.") if request.items
            else self.planner.for_workflow(workflow, values, also_accepted=("total_images",))
            for index, (_, values) in enumerate(items)
        ]
        for model_id in {plan.model_id for plan in plans}:
            self.acceptance.native_size(model_id)  # may wait for a first model build: not under the lock
        parallel = {"requested": 1, "added": [], "refused": []}
        if configuration.parallel_processing and configuration.max_parallel_batches > 1:
            parallel = {"requested": configuration.max_parallel_batches,
                        **self.pool.ensure_parallel(configuration.max_parallel_batches, plans[0].model_id)}
        record = BatchRecord(
            id=batch_id,
            priority=request.priority,
            workflow_id=workflow.id,
            name=request.name or f"{workflow.id} x{len(items)}",
            request=request.model_dump(mode="json", exclude_none=True),
            configuration=configuration.model_dump(),
            parallel=parallel,
            item_ids=[f"{batch_id}/{item_id}" for item_id, _ in items],
            session_id=session_id,
        )
        sizing = BatchSizing.for_configuration(batch_id, configuration)
        members = [ItemRecord(id=record_id, priority=request.priority, batch_id=batch_id, item_id=item_id,
                              index=index, parameters=values, seed=values.get("seed"))
                   for index, (record_id, (item_id, values)) in enumerate(zip(record.item_ids, items))]
        return PreparedBatch(record, members, plans, sizing)

    def _accept(self, prepared: PreparedBatch) -> BatchRecord:
        """On the loop: the batch and its items join and start together, unless one with its id came first
        (that one is the answer)."""
        existing = self.book.batches.get(prepared.record.id)
        if existing is not None:
            return existing
        self.acceptance.check_capacity(len(prepared.members))
        self._join(prepared)
        return prepared.record

    def start_child(self, prepared: PreparedBatch) -> list[Job]:
        """On the loop: a session's batch joins and starts (its session was accepted: no capacity check); the
        batch that session made before under that id (a restart, a new run after a process restart) goes
        first, its outputs with it. An id another request holds is an invalid_request."""
        earlier = self.book.batches.get(prepared.record.id)
        if earlier is not None and earlier.session_id == prepared.record.session_id:
            self._delete(earlier, delete_files=True)
        return self._join(prepared)

    def _join(self, prepared: PreparedBatch) -> list[Job]:
        record, members = prepared.record, prepared.members
        self.book.require_free_id(record, record.item_ids)
        self.store.add_records([record, *members])  # refused here, nothing of it stays
        self.book.add(record)
        log.info("Batch '%s' accepted: %d item(s) of %s", record.id, len(members), record.workflow_id)
        jobs = [self.jobs.admit(member, plan, prepared.sizing) for member, plan in zip(members, prepared.plans)]
        self.jobs.launch(jobs)
        return jobs

    def _item_parameters(self, request: ExecuteBatchRequest, parameters: dict, total: int) -> list[tuple[str, dict]]:
        limit = self.acceptance.max_items
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

    def recovery_plans(self, record: BatchRecord, items: list[ItemRecord]) \
            -> tuple[BatchSizing, dict[str, RunPlan | WorkerError]]:
        """For a stored batch: its items' sizing, and each item's plan (or why it can no longer run)."""
        with field_names.reading_stored(record.label()):
            configuration = parse(BatchConfiguration, record.configuration)
        sizing = BatchSizing.for_configuration(record.id, configuration)
        try:
            workflow = self.workflows.take_for_run(record.workflow_id)
        except WorkerError as error:
            return sizing, {item.id: error for item in items}
        plans: dict[str, RunPlan | WorkerError] = {}
        for item in items:
            try:
                with field_names.reading_stored(item.label()):
                    plans[item.id] = self.planner.for_workflow(workflow, item.parameters)
                self.acceptance.native_size(plans[item.id].model_id)
            except WorkerError as error:
                plans[item.id] = error
        return sizing, plans

    def status(self, batch_id: str, include_items: bool) -> dict:
        return self.describe(self.record(batch_id), include_items)

    def runs_of(self, batch_id: str):
        """A batch and the runs doing its items' work."""
        record = self.record(batch_id)
        runs = [self.jobs.run_of(item_id) for item_id in record.item_ids]
        return record, [run for run in runs if run is not None]

    def current_metrics(self) -> dict:
        """The batch manager's figures now, summed over every batch it holds: what `metrics` says of one."""
        records = list(self.book.batches.values())
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
            "memory_usage_peak": max((m.peak_used for m in self.pool.monitors.values()), default=0),
            "dynamic_adjustments": sum(m["dynamic_adjustments"] for m in metrics),
        }

    def control(self, request: ControlBatchRequest) -> dict:
        verb = request.action
        record = self.record(request.batch_id)
        plans = self._retry_plans(record) if verb == "retry" else {}
        self.loop.call(self._control, record, verb, plans)
        if verb == "pause":  # one step boundary away; other controls may come meanwhile
            self.loop.wait_for(lambda: not any(item.state is WorkState.PAUSING for item in self.items(record)),
                               PAUSE_WAIT_SECONDS)
        reply = self.describe(record, request.include_items)
        reply["action"] = verb
        return reply

    def _control(self, record: BatchRecord, verb: str, plans: dict[str, RunPlan]) -> None:
        """On the loop: decided on the batch's status now, done to every item in the same message."""
        jobs = self.jobs
        if self.book.batches.get(record.id) is not record:
            raise NotFound(f"Batch '{record.id}' not found")
        items = self.items(record)
        status = batch_view.status(items)
        allowed = {"pause": (PENDING, RUNNING), "resume": (PAUSED,), "cancel": (PENDING, RUNNING, PAUSED)}
        if verb in allowed and status not in allowed[verb]:
            raise InvalidState(f"{record.label()} cannot {verb} in current status: {status}")
        if verb == "retry":
            self._retry(record, items, plans)
            return
        act = {"pause": jobs.pause, "resume": jobs.resume, "cancel": jobs.cancel}[verb]
        for item in items:
            act(jobs.job(item.id))

    def _retry_plans(self, record: BatchRecord) -> dict[str, RunPlan]:
        """Off the loop: failed items restored from the store have no plan; they are planned again here."""
        unplanned = [item for item in self.items(record)
                     if item.status == FAILED and self.jobs.job(item.id).plan is None]
        plans = self.recovery_plans(record, unplanned)[1] if unplanned else {}
        for plan in plans.values():
            if isinstance(plan, WorkerError):
                raise plan
        return plans

    def _retry(self, record: BatchRecord, items: list[ItemRecord], plans: dict[str, RunPlan]) -> None:
        failed = [item for item in items if item.status == FAILED]
        if not failed:
            status = batch_view.status(items)
            raise InvalidState(f"{record.label()} has no failed items to retry (status: {status})")
        if any(self.jobs.job(item.id).plan is None and item.id not in plans for item in failed):
            raise InvalidState(f"{record.label()} changed while its retry was planned; retry again")
        if batch_view.status(items) in FINAL:
            record.attempt += 1
            self.book.update(record)
        for item in failed:
            self.jobs.restart(self.jobs.job(item.id), plans.get(item.id))

    def delete(self, request: DeleteBatchRequest) -> dict:
        record = self.record(request.batch_id)
        released = self.loop.call(self._delete, record, request.delete_files)
        return ok(batch_id=record.id, deleted=True, released_outputs=len(released))

    def _delete(self, record: BatchRecord, delete_files: bool) -> list[dict]:
        if self.book.batches.get(record.id) is not record:
            raise NotFound(f"Batch '{record.id}' not found")
        jobs = [job for job in map(self.jobs.job, record.item_ids) if job is not None]
        released = self.jobs.delete(record.id, jobs, delete_files)
        self.book.remove(record)
        self.pool.forget(record.id)
        return released

    # ---- replies ---------------------------------------------------------------------------

    def _find(self, batch_id: str) -> BatchRecord | None:
        return self.book.batches.get(batch_id)

    def record(self, batch_id: str) -> BatchRecord:
        """The batch `batch_id` names; NotFound when there is none."""
        record = self._find(batch_id)
        if record is None:
            raise NotFound(f"Batch '{batch_id}' not found")
        return record

    def items(self, record: BatchRecord) -> list[ItemRecord]:
        items = self.book.items
        return [item for item in map(items.get, record.item_ids) if item is not None]

    def figures(self, record: BatchRecord, items: list[ItemRecord] | None = None) -> dict:
        """Counts, progress (0-100), pace and ETA: what the status reply, the board and trackers show."""
        items = self.items(record) if items is None else items
        runs = {item.id: self.jobs.run_of(item.id) for item in items}
        return batch_view.figures(record, items, lambda item: runs[item.id].progress if runs[item.id] else 0.0,
                                  lambda item: runs[item.id].eta_seconds if runs[item.id] else None)

    def describe(self, record: BatchRecord, include_items: bool) -> dict:
        items = self.items(record)
        figures = self.figures(record, items)
        error, failed = batch_view.failure(items)
        reply = ok(
            **figures,
            name=record.name,
            workflow_id=record.workflow_id,
            priority=record.priority,
            attempt=record.attempt,
            created_at=iso(record.created_at),
            started_at=iso(batch_view.started_at(items)),
            completed_at=iso(batch_view.completed_at(items)),
            error=error,
            outputs=[ref for item in items for ref in item.outputs],
            metrics=self._metrics(record, [self.jobs.run_of(i.id) for i in items]),
            configuration=dict(record.configuration),
            parallel=dict(record.parallel),
            board_slot=record.board_slot,
        )
        if record.session_id is not None:
            reply["session_id"] = record.session_id
        reply["progress"] = int(figures["progress"])
        if failed is not None:
            reply["failed"] = failed
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
        monitors = self.pool.monitors.values()
        adjustments = self.pool.resizes(record.id)
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
        run = self.jobs.run_of(item.id)
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
        if item.restarts and run is not None:  # recovered work: where its images continued from
            state["resumed_from_step"] = resumed_from_step(run.all_tasks)
        return state

