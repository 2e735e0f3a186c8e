"""inference.* and postprocessing.*: one operation asked for directly runs as a one-operation session.

`inference.text2img {prompt, ...}` is the inline coordination
`{domains: [{domain: "inference", operation: "text2img", parameters}]}`, so
direct calls get sessions, progress, pause, cancel and outputs like any
workflow. `inference.batch_process` is `execute_batch`.
"""

from __future__ import annotations

from ..engine import Engine
from ..operations import OPERATIONS
from ..protocol import ExecuteBatchRequest, ExecuteWorkflowRequest, parse

SESSION_FIELDS = ("session_id", "priority", "background")
IGNORED_FIELDS = ("action", "request_id", "coordination_id", "type")
IMAGE_ALIASES = ("output_id", "input_id", "image")


class OperationInstructor:
    def __init__(self, engine: Engine, domain: str):
        self.engine = engine
        self.domain = domain
        self.operations = sorted(op.name for op in OPERATIONS.values() if op.domain == domain)
        extra = ("batch_process",) if domain == "inference" else ()
        self.commands = (*self.operations, *extra, "get_status")

    def run(self, operation: str, data: dict) -> dict:
        request = {k: data[k] for k in SESSION_FIELDS if k in data}
        parameters = {k: v for k, v in data.items() if k not in SESSION_FIELDS + IGNORED_FIELDS}
        for alias in IMAGE_ALIASES:
            if alias in parameters and "init_image" not in parameters:
                parameters["init_image"] = parameters.pop(alias)
        request["domains"] = [{"domain": self.domain, "operation": operation, "parameters": parameters}]
        return self.engine.sessions.execute(parse(ExecuteWorkflowRequest, request))

    def batch_process(self, data: dict) -> dict:
        return self.engine.batches.execute(parse(ExecuteBatchRequest, data))

    def get_status(self, data: dict) -> dict:
        status = self.engine.status()
        return {"operations": list(self.operations), **status[self.domain]}
