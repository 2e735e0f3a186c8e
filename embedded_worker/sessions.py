"""SessionService: one session per workflow execution, from request to deletion.

A session is a record (status, times, outputs) and a WorkflowRun doing the
work. The same caller id twice gives back the first session, never a second
run. Every status change goes through the StateBook; this module only asks.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from typing import TYPE_CHECKING

from .errors import InvalidState, NotFound, WorkerError
from .progress_board import state_code
from .protocol import (
    ControlSessionRequest,
    DeleteSessionRequest,
    ExecuteWorkflowRequest,
    ListSessionsRequest,
    iso,
    ok,
    parse,
)
from .record_owner import RecordOwner
from .recovery import suspect_check
from .runner import WorkflowRun
from .state import (
    ADDED,
    CANCELLED,
    COMPLETED,
    FAILED,
    FINAL,
    PAUSED,
    PENDING,
    REMOVED,
    RUNNING,
    SessionRecord,
)

if TYPE_CHECKING:
    from .engine import Engine
    from .planning import RunPlan

PAUSE_WAIT_SECONDS = 30.0  # one step boundary away; a loaded machine may take seconds to reach it
log = logging.getLogger("embedded_worker.sessions")


class SessionService:
    def __init__(self, engine: "Engine"):
        self.engine = engine
        self._runs: dict[str, WorkflowRun] = {}  # guarded by engine.book.lock
        self._plans: dict[str, "RunPlan"] = {}
        self._workflows: dict[str, dict] = {}
        self._control = threading.RLock()  # one control or delete at a time: a delete never meets a restart halfway
        engine.book.listeners.append(self._record_event)

    # ---- the progress board ----------------------------------------------------------------

    def _record_event(self, record, event: str) -> None:
        if record.kind != "session":
            return
        board = self.engine.board
        if event == ADDED:
            record.board_slot = board.claim("session", record.id)
        elif event == REMOVED:
            board.release(record.id)
            return
        self._publish(record, self._runs.get(record.id))

    def _publish(self, record: SessionRecord, run: WorkflowRun | None) -> None:
        if record.board_slot < 0:
            return
        values = {"state": state_code(record.status), "total_steps": record.total_steps, "attempt": record.attempt}
        if run is not None:
            tasks = [t for w in run.work for t in w.tasks]
            eta = run.eta_seconds
            values.update(
                progress_bp=10000 if record.status == COMPLETED else int(run.progress * 10000),
                current_step=run.current_step,
                denoise_step=max((t.step for t in tasks), default=0),
                denoise_total=max((t.total_steps for t in tasks), default=0),
                items_done=len(record.outputs),
                eta_ms=0 if record.status in FINAL else (-1 if eta is None else int(eta * 1000)),
            )
        self.engine.board.publish(record.board_slot, values)

    # ---- commands --------------------------------------------------------------------------

    def execute(self, request: ExecuteWorkflowRequest) -> dict:
        engine = self.engine
        engine.ensure_open()
        session_id = request.session_id or request.coordination_id or str(uuid.uuid4())
        existing = self._find(session_id)
        if existing is None:
            plan, workflow, fallback = self._plan(request)
            engine.native_size(plan.model_id)  # may wait for a first model build: not under the lock
            record = SessionRecord(
                id=session_id,
                priority=request.priority,
                workflow_id=plan.workflow_id,
                request=request.model_dump(mode="json", exclude_none=True),
                total_steps=len(plan.steps),
            )
            with engine.book.lock:
                existing = engine.book.sessions.get(session_id)
                if existing is None:
                    engine.check_capacity(1)  # checked and taken under one lock: concurrent submits never pass it
                    engine.book.require_free_id(record)
                    log.info("Session '%s' accepted: %s, priority %d", session_id, plan.workflow_id or "inline",
                             request.priority)
                    engine.book.add(record)
                    self._plans[session_id] = plan
                    self._workflows[session_id] = workflow
                    self._start(record, plan)
        record = existing or record
        if not request.background:
            engine.wait_final(record)
        reply = self.describe(record)
        plan = self._plans.get(record.id)
        queue_s, run_s = engine.estimate(plan, fallback if existing is None else 0.0) if plan else (0.0, 0.0)
        reply["estimated_time"] = round(queue_s + run_s, 3)
        reply["workflow"] = self._workflows.get(record.id) or {"id": record.workflow_id}
        reply["duplicate"] = existing is not None
        return reply

    def _plan(self, request: ExecuteWorkflowRequest) -> tuple["RunPlan", dict, float]:
        engine = self.engine
        if request.domains is not None:
            plan = engine.planner.for_coordination(request.domains, request.coordination_mode == "parallel",
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
            return plan, workflow, 5.0
        definition = engine.workflows.take_for_run(request.workflow_id)
        plan = engine.planner.for_workflow(definition, request.parameters)
        return plan, engine.workflows.describe(definition.id), definition.estimated_duration

    def _start(self, record: SessionRecord, plan: "RunPlan") -> None:
        run = self._new_run(record, plan)
        self.engine.book.transition(record, PENDING)
        run.start()

    def _new_run(self, record: SessionRecord, plan: "RunPlan", isolated: bool = False) -> WorkflowRun:
        """The run doing this session's work, remembered as its current one."""
        engine = self.engine
        owner = RecordOwner(engine.book, engine.outputs, record, record.id, on_progress=self._publish)
        run = WorkflowRun(plan, owner, engine.pool, engine.cpu, record.priority, engine.native_size,
                          isolated=isolated)
        self._runs[record.id] = run
        return run

    def recover(self, record: SessionRecord) -> str:
        """A session the last process left unfinished: requeued, kept paused, failed or quarantined."""
        engine, book = self.engine, self.engine.book
        if engine.config.recovery == "fail":
            book.transition(record, FAILED, "the worker restarted before this session finished",
                            {"error_code": "unavailable"})
            return "failed"
        reason = suspect_check(record)
        if reason is not None:
            book.transition(record, FAILED, reason, {"error_code": "internal"})
            return "quarantined"
        try:
            plan, workflow, _ = self._plan(parse(ExecuteWorkflowRequest, record.request))
            engine.native_size(plan.model_id)
        except WorkerError as error:
            book.transition(record, FAILED, f"cannot resume after a restart: {error.message}",
                            {"error_code": error.code})
            return "failed"
        paused = record.status == PAUSED
        with book.lock:
            self._plans[record.id] = plan
            self._workflows[record.id] = workflow
            book.requeue_after_restart(record)
            run = self._new_run(record, plan, isolated=record.recoveries > 0)
        run.start(paused=paused)
        return "paused" if paused else "requeued"

    def status(self, session_id: str) -> dict:
        return self.describe(self._record(session_id))

    def run_of(self, session_id: str) -> tuple[SessionRecord, WorkflowRun | None]:
        """A session and the run doing its work (none when it was restored finished after a restart)."""
        record = self._record(session_id)
        return record, self._runs.get(record.id)

    def control(self, request: ControlSessionRequest) -> dict:
        book = self.engine.book
        verb = request.action
        with self._control:
            record = self._record(request.session_id)
            run = self._runs.get(record.id)
            if verb == "pause":
                if record.status not in (PENDING, RUNNING) or run is None:
                    raise InvalidState(f"{record.label()} cannot pause in current status: {record.status}")
                run.pause()
            elif verb == "resume":
                if run is None:
                    raise InvalidState(f"{record.label()} cannot resume in current status: {record.status}")
                book.require(record, PENDING, "resume")
                run.resume()
            elif verb == "cancel":
                book.require(record, CANCELLED, "cancel")
                if run is not None:
                    run.cancel()
            else:
                self._restart(record)
        if verb == "pause":  # outside the lock: other controls may come while the step boundary nears
            book.wait_until(lambda: record.status not in (PENDING, RUNNING), PAUSE_WAIT_SECONDS)
        reply = self.describe(record)
        reply["action"] = verb
        return reply

    def _restart(self, record: SessionRecord) -> None:
        engine = self.engine
        old = self._runs.get(record.id)
        engine.book.begin_attempt(record)  # raises for a completed session
        if old is not None:
            old.cancel()  # its owner ignores events from the previous attempt
        engine.outputs.release(record.id)
        record.outputs = []
        self._new_run(record, self._plans[record.id]).start()

    def delete(self, request: DeleteSessionRequest) -> dict:
        engine = self.engine
        with self._control:
            record = self._record(request.session_id)
            if record.status not in FINAL:
                engine.book.transition(record, CANCELLED)
            run = self._runs.pop(record.id, None)
            if run is not None:
                run.cancel()
            released = engine.outputs.release(record.id, delete_files=request.force_cleanup)
            with engine.book.lock:
                engine.book.remove(record)
                self._plans.pop(record.id, None)
                self._workflows.pop(record.id, None)
        return ok(session_id=record.id, deleted=True, released_outputs=len(released))

    def list(self, request: ListSessionsRequest) -> dict:
        with self.engine.book.lock:
            records = sorted(self.engine.book.sessions.values(), key=lambda r: r.created_at)
        if request.status:
            records = [r for r in records if r.status == request.status.lower()]
        return ok(sessions=[self._summary(r) for r in records[-request.limit :]], total=len(records))

    def cancel_all(self) -> None:
        with self.engine.book.lock:
            records = [r for r in self.engine.book.sessions.values() if r.status not in FINAL]
        for record in records:
            if self.engine.book.transition(record, CANCELLED, "the worker closed"):
                run = self._runs.get(record.id)
                if run is not None:
                    run.cancel()

    # ---- replies ---------------------------------------------------------------------------

    def _find(self, session_id: str) -> SessionRecord | None:
        with self.engine.book.lock:
            return self.engine.book.sessions.get(session_id)

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
        run = self._runs.get(record.id)
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
            "step_results": run.step_results() if run is not None else [],
            "board_slot": record.board_slot,
        }
        if record.error_details:
            reply["error_code"] = record.error_details.get("error_code")
            if record.error_details.get("details") is not None:
                reply["error_details"] = record.error_details["details"]
        return reply
