"""ProcessingWorker: the facade a .NET host (or any Python caller) talks to.

Thin by design: it validates the request against its pydantic model, routes
it, and wraps the answer in an envelope. Nothing raises across it: every
failure, including bugs, comes back as `{"success": false, "error",
"error_code"}`. Replies are plain JSON-able Python; pixels cross only as
numpy buffers (`get_output`, `allocate_input`).
"""

from __future__ import annotations

import logging
import math
import threading
from typing import Any, Callable

import numpy as np

from .. import interpreter_exit
from ..config import WorkerConfig
from ..errors import InternalError, InvalidRequest, NotFound, Unavailable, WorkerError
from ..log_bridge import LogBridge
from ..progress.batch_tracker import BatchProgressTracker
from . import field_names
from .call_forms import id_request, json_reply, json_text, polled_id, request_data, snake_case
from .messages import (
    BatchRequest,
    ControlBatchRequest,
    ControlSessionRequest,
    DeleteBatchRequest,
    DeleteSessionRequest,
    DomainStatusRequest,
    ExecuteBatchRequest,
    ExecuteWorkflowRequest,
    InputRequest,
    ListSessionsRequest,
    OutputRequest,
    Request,
    SessionRequest,
    WorkflowRequest,
    failure,
    ok,
    parse,
    parse_id,
)

log = logging.getLogger("embedded_worker")

DOMAIN_ALIASES = {
    "status": "get_status",
    "list": "list_models",
    "load": "load_model",
    "unload": "unload_model",
    "memory": "get_memory",
    "devices": "list_devices",
    "models": "list_models",
}
MAX_ERROR_CHARS = 2000  # an unexpected error's text in its envelope: enough to report, never a request


class ProcessingWorker:
    """The PROCESSING worker, in process: one method per protocol command."""

    def __init__(self, config: WorkerConfig | dict | str | None = None, **overrides: Any):
        from ..engine import Engine
        from .domains.device import DeviceInstructor
        from .domains.model import ModelInstructor
        from .domains.operation import OperationInstructor

        base = WorkerConfig.load(config)
        self.config = WorkerConfig.model_validate({**base.model_dump(), **overrides}) if overrides else base
        self._logs = LogBridge(self.config.log_capacity, getattr(logging, self.config.log_level))
        if log.getEffectiveLevel() > self._logs.level:
            log.setLevel(self._logs.level)  # else the records never reach the bridge
        log.addHandler(self._logs)
        try:
            self._engine = Engine(self.config)
        except BaseException:
            log.removeHandler(self._logs)  # a worker that never started leaves nothing attached
            raise
        self._closed = threading.Event()
        interpreter_exit.opened(self)  # closed at the interpreter's exit if the host never closes it
        self._instructors = {
            "device": DeviceInstructor(self._engine),
            "model": ModelInstructor(self._engine),
            "inference": OperationInstructor(self._engine, "inference"),
            "postprocessing": OperationInstructor(self._engine, "postprocessing"),
        }
        self._processing: dict[str, Callable[..., dict]] = {
            name: getattr(self, name)
            for name in (
                "get_workflows", "get_workflow", "execute_workflow", "get_session_status", "control_session",
                "delete_session", "execute_batch", "get_batch_status", "delete_batch", "control_batch",
                "list_sessions", "get_status", "output_info", "release_input", "board_layout",
            )
        }
        # the command names a host sends most, resolved once: these methods check their own request
        self._direct: dict[str, Callable[..., dict]] = {
            key: method for name, method in self._processing.items() for key in (name, f"processing.{name}")
        }

    # ---- the boundary ---------------------------------------------------------------------

    def _ensure_open(self) -> None:
        if self._closed.is_set():
            raise Unavailable("the worker is closed")

    def _call(self, fn: Callable[[], Any]) -> dict:
        """Run `fn` and envelope whatever happens; the one place errors become values. The request's fields
        that no model takes were refused, or (`unknown_request_fields: ignore`) are listed in the reply."""
        with field_names.answering(self.config.unknown_request_fields) as policy:
            try:
                self._ensure_open()
                result = fn()
                reply = result if isinstance(result, dict) and "success" in result else ok(**(result or {}))
            except WorkerError as error:
                reply = failure(error)
            except Exception as error:  # a bug must not cross into the host
                log.exception("unexpected error at the facade")
                reply = failure(InternalError(f"{type(error).__name__}: {error}"[:MAX_ERROR_CHARS]))
        if policy.ignored:
            reply["ignored_parameters"] = policy.ignored
        return reply

    # ---- the nine commands (and their companions) -----------------------------------------

    def get_workflows(self, request: Any = None, **kwargs: Any) -> dict:
        def run() -> dict:
            parse(Request, request_data(request, kwargs))
            engine = self._engine
            return ok(workflows=engine.workflows.describe_all(), models=engine.models.families(),
                      problems=engine.workflows.problems())

        return self._call(run)

    def get_workflow(self, request: Any = None, **kwargs: Any) -> dict:
        def run() -> dict:
            req = parse(WorkflowRequest, request_data(request, kwargs))
            return ok(workflow=self._engine.workflows.describe(req.workflow_id))

        return self._call(run)

    def execute_workflow(self, request: Any = None, **kwargs: Any) -> dict:
        return self._call(lambda: self._engine.sessions.execute(
            parse(ExecuteWorkflowRequest, request_data(request, kwargs))))

    def get_session_status(self, request: Any = None, **kwargs: Any) -> dict:
        session_id = polled_id(request, kwargs, "session_id")
        if session_id is not None and not self._closed.is_set():
            # the polling hot path: an id the Id type would pass unchanged, so no model is built
            try:
                return self._engine.sessions.status(session_id)
            except WorkerError as error:
                return failure(error)
            except Exception:
                pass  # the general path below logs it and answers `internal`
        if isinstance(request, str) and not kwargs and not json_text(request):
            return self._call(lambda: self._engine.sessions.status(parse_id(request, "session_id")))
        return self._call(lambda: self._engine.sessions.status(
            parse(SessionRequest, request_data(id_request(request, "session_id"), kwargs)).session_id))

    def control_session(self, request: Any = None, **kwargs: Any) -> dict:
        return self._call(lambda: self._engine.sessions.control(
            parse(ControlSessionRequest, request_data(request, kwargs))))

    def delete_session(self, request: Any = None, **kwargs: Any) -> dict:
        return self._call(lambda: self._engine.sessions.delete(
            parse(DeleteSessionRequest, request_data(id_request(request, "session_id"), kwargs))))

    def execute_batch(self, request: Any = None, **kwargs: Any) -> dict:
        return self._call(lambda: self._engine.batches.execute(
            parse(ExecuteBatchRequest, request_data(request, kwargs))))

    def get_batch_status(self, request: Any = None, **kwargs: Any) -> dict:
        def run() -> dict:
            req = parse(BatchRequest, request_data(id_request(request, "batch_id"), kwargs))
            return self._engine.batches.status(req.batch_id, req.include_items)

        return self._call(run)

    def delete_batch(self, request: Any = None, **kwargs: Any) -> dict:
        return self._call(lambda: self._engine.batches.delete(
            parse(DeleteBatchRequest, request_data(id_request(request, "batch_id"), kwargs))))

    def control_batch(self, request: Any = None, **kwargs: Any) -> dict:
        return self._call(lambda: self._engine.batches.control(
            parse(ControlBatchRequest, request_data(request, kwargs))))

    def list_sessions(self, request: Any = None, **kwargs: Any) -> dict:
        return self._call(lambda: self._engine.sessions.list(parse(ListSessionsRequest, request_data(request, kwargs))))

    def get_status(self, request: Any = None, **kwargs: Any) -> dict:
        """Every domain's status; with a session_id or batch_id, that work's part in each domain asked for."""
        from . import domain_status

        def run() -> dict:
            req = parse(DomainStatusRequest, request_data(request, kwargs))
            work = domain_status.find_work(self._engine, req)
            return ok(**(self._engine.status() if work is None else domain_status.aggregate(self._engine, req, work)))

        return self._call(run)

    # ---- pixels -----------------------------------------------------------------------------

    def get_output(self, output_id: Any) -> np.ndarray | dict:
        """The output's pixels: the read-only uint8 HxWxC array itself, or an error envelope."""
        result = self._call(lambda: {"success": True, "pixels": self._engine.outputs.get(
            parse(OutputRequest, request_data(id_request(output_id, "output_id"), {})).output_id).pixels})
        return result["pixels"] if result["success"] else result

    def output_info(self, request: Any = None, **kwargs: Any) -> dict:
        def run() -> dict:
            req = parse(OutputRequest, request_data(id_request(request, "output_id"), kwargs))
            buffer = self._engine.outputs.get(req.output_id)
            return ok(output=buffer.reference(), metadata=buffer.metadata, owner_id=buffer.owner_id)

        return self._call(run)

    def allocate_input(self, height: Any, width: Any, channels: Any = 3) -> dict:
        """A writable uint8 HxWxC buffer for the host to fill, and the `input_id` that names it."""
        def run() -> dict:
            input_id, pixels = self._engine.outputs.allocate_input(height, width, channels)
            return ok(input_id=input_id, height=height, width=width, channels=channels, buffer=pixels)

        return self._call(run)

    def release_input(self, request: Any = None, **kwargs: Any) -> dict:
        def run() -> dict:
            input_id = parse(InputRequest, request_data(id_request(request, "input_id"), kwargs)).input_id
            if not self._engine.outputs.release_input(input_id):
                raise NotFound(f"Input '{input_id}' not found")
            return ok(input_id=input_id, released=True)

        return self._call(run)

    def track_batch(self, batch_id: Any, on_update: Callable[[dict], None] | None = None):
        """A BatchProgressTracker for a Python caller; an error envelope for an unknown batch."""
        try:
            self._ensure_open()
            return BatchProgressTracker(self._engine.feed, parse_id(batch_id, "batch_id"), on_update)
        except WorkerError as error:
            return failure(error)

    # ---- what a host reads without calls: the progress board, and its logs ----------------------

    def progress_board(self) -> np.ndarray:
        """The board itself (read-only int64 slots x fields); take its buffer once, read it forever."""
        return self._engine.board.view()

    def board_layout(self, request: Any = None, **kwargs: Any) -> dict:
        def run() -> dict:
            parse(Request, request_data(request, kwargs))
            return ok(**self._engine.board.layout())

        return self._call(run)

    def read_board_slot(self, slot: Any) -> dict:
        """One slot, read with the same sequence protocol a host uses (for Python callers and tests)."""
        def run() -> dict:
            layout = self._engine.board.layout()
            if not isinstance(slot, int) or isinstance(slot, bool) or not 0 <= slot < layout["slots"]:
                raise InvalidRequest(f"slot: must be an integer from 0 to {layout['slots'] - 1}, got {slot!r}")
            return ok(slot=slot, **self._engine.board.read(slot))

        return self._call(run)

    def drain_logs(self, max_records: Any = 1000) -> dict:
        """The worker's log records since the last drain (oldest first) and how many were dropped."""
        def run() -> dict:
            if not isinstance(max_records, int) or isinstance(max_records, bool) or max_records < 1:
                raise InvalidRequest(f"max_records: must be a positive integer, got {max_records!r}")
            records, dropped = self._logs.drain(max_records)
            return ok(records=records, dropped=dropped)

        return self._call(run)

    # ---- the command entry -----------------------------------------------------------------

    def execute(self, command: Any, request: Any = None) -> dict | str:
        """The drop-in for the C# `ExecuteAsync(workerType, command, request)`.

        `command` may carry a domain prefix (`inference.batch_process`). A JSON
        string in gives a JSON string out. The distributed form
        `{"type", "request_id", "data"}` (as `request`, or alone as `command`)
        is answered as `{"success", "request_id", "data"}`.
        """
        if type(request) is dict and "type" not in request:
            direct = self._direct.get(command) if type(command) is str else None
            if direct is not None:  # the hot path: no second copy and check of the request, no name parsing
                return direct(request)
        as_json = isinstance(request, str) or (request is None and json_text(command))
        try:
            if request is None and (isinstance(command, dict) or json_text(command)):
                command, request = None, command  # the distributed form, alone
            data = request_data(request, {})
        except WorkerError as error:
            reply = failure(error)
            return json_reply(reply) if as_json else reply
        if isinstance(data.get("type"), str) and "data" in data and isinstance(data["data"], (dict, type(None))):
            reply = self._route(data["type"], data["data"] or {})
            body = {k: v for k, v in reply.items() if k not in ("success", "error", "error_code", "details")}
            reply = {"success": reply["success"], "request_id": data.get("request_id"), "data": body,
                     **{k: reply[k] for k in ("error", "error_code", "details") if k in reply}}
        else:
            reply = self._route(command, data)
        return json_reply(reply) if as_json else reply

    def _route(self, command: Any, data: dict) -> dict:
        def run() -> dict:
            if not isinstance(command, str) or not command.strip():
                raise InvalidRequest("command: required, e.g. 'execute_workflow' or 'inference.text2img'")
            domain, _, name = command.strip().rpartition(".")
            domain, name = snake_case(domain or "processing"), snake_case(name)
            if domain == "processing":
                handler = self._processing.get(name)
                if handler is None:
                    raise InvalidRequest(f"command: unknown command '{command}'",
                                         details={"known": sorted(self._processing)})
                return handler(data)
            instructor = self._instructors.get(domain)
            if instructor is None:
                raise InvalidRequest(f"command: unknown domain '{domain}'",
                                     details={"known": ["processing", *sorted(self._instructors)]})
            name = DOMAIN_ALIASES.get(name, name)
            if name not in instructor.commands:
                raise InvalidRequest(f"command: unknown command '{command}'",
                                     details={"known": [f"{domain}.{c}" for c in instructor.commands]})
            handler = getattr(instructor, name, None)
            return handler(data) if handler is not None else instructor.run(name, data)

        return self._call(run)

    # ---- lifetime ----------------------------------------------------------------------------

    def close(self, timeout: Any = 30.0, pending: Any = "suspend") -> dict:
        """Stop accepting work, settle unfinished work, join every thread. Call before PythonEngine.Shutdown().

        `pending`: "suspend" (unfinished work stays stored and resumes at the
        next start), "cancel", or "finish" (let it finish within `timeout`,
        then suspend the rest).
        """
        if pending not in ("suspend", "cancel", "finish"):
            return failure(InvalidRequest(f"pending: must be suspend, cancel or finish, got {pending!r}"))
        if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or not 0 <= timeout < math.inf:
            return failure(InvalidRequest(f"timeout: must be a finite, non-negative number of seconds, "
                                          f"got {timeout!r}"))
        if self._closed.is_set():
            return ok(closed=True, threads_stopped=self._engine.threads_stopped())
        self._closed.set()
        try:
            stopped = self._engine.close(float(timeout), pending)
        except Exception as error:
            log.exception("close failed")
            return failure(InternalError(f"close failed: {error}"))
        finally:
            log.removeHandler(self._logs)
            interpreter_exit.closed(self)
        return ok(closed=True, threads_stopped=stopped)

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    def __enter__(self) -> "ProcessingWorker":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()
