"""SessionService: a session's requests in, its replies out; its life is a job (`jobs.JobService`).

The same caller id twice gives back the first session, never a second run.
Planning turns the request into a RunPlan on the caller's thread;
everything after (acceptance, status changes, controls, restart, deletion)
is one message each to the lifecycle loop, where the job service acts. A new session
is on disk before it is accepted: one the store cannot take (a full disk)
is refused and leaves nothing behind.
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import TYPE_CHECKING

from ..api import field_names
from ..api.messages import ExecuteWorkflowRequest, iso, ok, parse
from ..errors import InvalidRequest, InvalidState, NotFound
from .launched_steps import resumed_from_step
from .state import COMPLETED, FINAL, PAUSED, BatchRecord, SessionRecord, WorkState

if TYPE_CHECKING:
    from ..api.messages import ControlSessionRequest, DeleteSessionRequest, ListSessionsRequest
    from ..outputs.store import OutputStore
    from ..workflows.catalog import WorkflowCatalog
    from .acceptance import Acceptance
    from .jobs import JobService
    from .loop import LifecycleLoop
    from .planning import Planner, RunPlan
    from .state import StateBook
    from .store import StateStore

COORDINATION_SECONDS_PER_STEP = 0.25  # a coordination's estimate before any step was measured (20 steps: 5 s)
PAUSE_WAIT_SECONDS = 30.0  # one step boundary away; a loaded machine may take seconds to reach it
log = logging.getLogger("embedded_worker.sessions")


class SessionService:
    def __init__(self, book: StateBook, loop: LifecycleLoop, store: StateStore, jobs: JobService,
                 acceptance: Acceptance, planner: Planner, workflows: WorkflowCatalog, outputs: OutputStore):
        self.book = book
        self.loop = loop
        self.store = store
        self.jobs = jobs
        self.acceptance = acceptance
        self.planner = planner
        self.workflows = workflows
        self.outputs = outputs
        self._described: dict[str, dict] = {}  # session id -> its workflow as the execute reply shows it

    # ---- commands --------------------------------------------------------------------------

    def execute(self, request: ExecuteWorkflowRequest) -> dict:
        acceptance = self.acceptance
        acceptance.ensure_open()
        session_id = request.session_id or request.coordination_id or str(uuid.uuid4())
        existing = self._find(session_id)
        fallback = 0.0
        if existing is None:
            plan, workflow, fallback = self.plan(request)  # on the caller's thread: it may build a model
            if plan.model_id not in plan.models:
                acceptance.native_size(plan.model_id)
            record = SessionRecord(id=session_id, priority=request.priority, workflow_id=plan.workflow_id,
                                   request=request.model_dump(mode="json", exclude_none=True),
                                   total_steps=len(plan.steps))
            existing = self.loop.call(self._accept, record, plan, workflow, request.priority)
        record = existing or record
        if not request.background:
            acceptance.wait_final(record, lambda: record.status in FINAL)
        reply = self.describe(record)
        job = self.jobs.job(record.id)
        queue_s, run_s = acceptance.estimate(job.plan, fallback) if job is not None and job.plan else (0.0, 0.0)
        reply["estimated_time"] = round(queue_s + run_s, 3)
        reply["workflow"] = self._described.get(record.id) or {"id": record.workflow_id}
        reply["duplicate"] = existing is not None
        return reply

    def _accept(self, record: SessionRecord, plan: RunPlan, workflow: dict, priority: int) -> SessionRecord | None:
        """On the loop: the session joins and starts, unless one with its id came first (returned)."""
        existing = self.book.sessions.get(record.id)
        if existing is not None:
            return existing
        self.acceptance.check_capacity(1)
        self.book.require_free_id(record)
        for step in plan.steps:  # its batch_process steps' batches will take these ids
            if step.operation.makes_batch:
                batch = BatchRecord(id=step.params.batch_id)
                if batch.id == record.id:
                    raise InvalidRequest(f"domains.{step.order - 1}.parameters.batch_id: '{batch.id}' is the "
                                         f"session's own id", details={"field": "batch_id"})
                self.book.require_free_id(batch, [f"{batch.id}/item-{i:04d}" for i in range(step.params.num_images)])
        registered = self.planner.register(plan)  # a refused request registers no model
        try:
            self.store.add_records([record])  # refused here, nothing of it stays
        except Exception:
            self.planner.models.forget(registered)
            raise
        log.info("Session '%s' accepted: %s, priority %d", record.id, plan.workflow_id or "inline", priority)
        self._described[record.id] = workflow
        self.jobs.launch([self.jobs.admit(record, plan)])
        return None

    def plan(self, request: ExecuteWorkflowRequest) -> tuple[RunPlan, dict, float]:
        """(the plan, the workflow as the reply shows it, the estimate before any step was measured)."""
        if request.domains is not None:
            plan = self.planner.for_coordination(request.domains, request.coordination_mode == "parallel",
                                                 request.workflow_id)
            workflow = {
                "id": request.workflow_id or request.coordination_id or "inline-coordination",
                "name": "inline coordination",
                "description": f"{request.coordination_mode} coordination of {len(plan.steps)} operations",
                "category": "coordination",
                "steps": [
                    {"order": i + 1, "domain": s.operation.domain, "operation": s.operation.name,
                     "description": s.operation.description}
                    for i, s in enumerate(plan.steps)
                ],
            }
            return plan, workflow, plan.run_steps * COORDINATION_SECONDS_PER_STEP
        definition = self.workflows.take_for_run(request.workflow_id)
        plan = self.planner.for_workflow(definition, request.parameters)
        return plan, self.workflows.describe(definition.id), definition.estimated_duration

    def plan_stored(self, record: SessionRecord) -> RunPlan:
        """The plan of a session stored by an earlier process (WorkerError when it can no longer run)."""
        with field_names.reading_stored(record.label()):
            plan, workflow, _ = self.plan(parse(ExecuteWorkflowRequest, record.request))
        self.planner.register(plan)
        self.acceptance.native_size(plan.model_id)
        self._described[record.id] = workflow
        return plan

    def status(self, session_id: str) -> dict:
        return self.describe(self._record(session_id))

    def run_of(self, session_id: str):
        """A session and the run doing its work (none when it was restored finished after a restart)."""
        record = self._record(session_id)
        return record, self.jobs.run_of(record.id)

    def control(self, request: ControlSessionRequest) -> dict:
        verb = request.action
        record = self._record(request.session_id)
        plan = None
        if verb == "restart" and self.jobs.job(record.id).plan is None:
            plan = self.plan_stored(record)  # restored from the store: planned again, off the loop
        self.loop.call(self._control, record, verb, plan)
        if verb == "pause":  # one step boundary away; other controls may come meanwhile
            self.loop.wait_for(lambda: record.state is not WorkState.PAUSING, PAUSE_WAIT_SECONDS)
        reply = self.describe(record)
        reply["action"] = verb
        return reply

    def _control(self, record: SessionRecord, verb: str, plan: RunPlan | None) -> None:
        """On the loop: decided and done in one message."""
        jobs = self.jobs
        job = jobs.job(record.id)
        if job is None:
            raise NotFound(f"Session '{record.id}' not found")
        if verb == "restart":
            jobs.restart(job, plan)
        elif not {"pause": jobs.pause, "resume": jobs.resume, "cancel": jobs.cancel}[verb](job):
            raise InvalidState(f"{record.label()} cannot {verb} in current status: {record.status}")

    def delete(self, request: DeleteSessionRequest) -> dict:
        record = self._record(request.session_id)
        released = self.loop.call(self._delete, record, request.delete_files)
        return ok(session_id=record.id, deleted=True, released_outputs=len(released))

    def _delete(self, record: SessionRecord, delete_files: bool) -> list[dict]:
        if self.book.sessions.get(record.id) is not record:
            raise NotFound(f"Session '{record.id}' not found")
        self._described.pop(record.id, None)
        return self.jobs.delete(record.id, [self.jobs.job(record.id)], delete_files)

    def list(self, request: ListSessionsRequest) -> dict:
        records = sorted(list(self.book.sessions.values()), key=lambda r: r.created_at)
        if request.status:
            records = [r for r in records if r.status == request.status.lower()]
        return ok(sessions=[self._summary(r) for r in records[-request.limit :]], total=len(records))

    # ---- replies ---------------------------------------------------------------------------

    def _find(self, session_id: str) -> SessionRecord | None:
        return self.book.sessions.get(session_id)  # one dict read is atomic: a status poll takes no lock

    def _record(self, session_id: str) -> SessionRecord:
        record = self._find(session_id)
        if record is None:
            raise NotFound(f"Session '{session_id}' not found")
        return record

    def _summary(self, record: SessionRecord) -> dict:
        return {"session_id": record.id, "workflow_id": record.workflow_id, "status": record.status,
                "priority": record.priority, "created_at": iso(record.created_at),
                "completed_at": iso(record.completed_at)}

    def describe(self, record: SessionRecord) -> dict:
        run = self.jobs.run_of(record.id)
        status = record.status
        now = time.time()
        progress = 1.0 if status == COMPLETED else (run.progress if run is not None else 0.0)
        queued_at = record.queued_at or record.created_at
        queue_seconds = (record.started_at or (record.completed_at or now)) - queued_at
        run_seconds = ((record.completed_at or now) - record.started_at) if record.started_at else 0.0
        eta = None
        if status in FINAL:
            eta = 0.0
        elif run is not None and run.eta_seconds is not None and status != PAUSED:
            eta = run.eta_seconds
        reply = {  # a literal, not ok(**...): this is the polling hot path
            "success": True,
            "session_id": record.id,
            "workflow_id": record.workflow_id,
            "status": status,
            "current_step": run.current_step if run is not None else 0,
            "total_steps": record.total_steps,
            "progress": int(progress * 100),
            "detailed_progress": {
                "current_operation": run.current_operation if run is not None else "",
                "substep_progress": run.substep_progress if run is not None else 0.0,
                "eta_seconds": eta,
                "queue_seconds": queue_seconds,
                "run_seconds": run_seconds,
            },
            "priority": record.priority,
            "attempt": record.attempt,
            "created_at": iso(record.created_at),
            "started_at": iso(record.started_at),
            "completed_at": iso(record.completed_at),
            "error": record.error,
            "outputs": list(record.outputs),
            "step_results": run.step_results() if run is not None else list(record.step_results),
            "board_slot": record.board_slot,
        }
        if record.error_details:
            reply["error_code"] = record.error_details.get("error_code")
            if record.error_details.get("details") is not None:
                reply["error_details"] = record.error_details["details"]
        if record.restarts and run is not None:  # recovered work: where its images continued from
            reply["detailed_progress"]["resumed_from_step"] = resumed_from_step(run.all_tasks)
        return reply
