"""inference.* and postprocessing.*: one operation asked for directly runs as a one-operation session.

`inference.text2img {prompt, ...}` is the inline coordination
`{domains: [{domain: "inference", operation: "text2img", parameters}]}`, so
direct calls get sessions, progress, pause, cancel and outputs like any
workflow. `inference.batch_process` is `execute_batch` (as a coordination
step it makes the same batch, a child of the session: `lifecycle.child_batch`). The inference domain also
answers what the batch manager knows: the batch size the memory monitor
would pick now (`recommend_batch_size`) and its figures (`get_metrics`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ...workflows.operations import OPERATIONS
from .. import domain_status
from ..messages import (
    BatchMetricsRequest,
    DomainStatusRequest,
    ExecuteBatchRequest,
    ExecuteWorkflowRequest,
    RecommendBatchSizeRequest,
    parse,
)

if TYPE_CHECKING:
    from ...engine import Engine

# the session's own fields (in either spelling, as execute_workflow takes them); every other field but the
# command's name in `action` is a parameter of the operation, which refuses one it does not take
SESSION_FIELDS = ("session_id", "sessionId", "coordination_id", "coordinationId", "priority", "background")
IMAGE_ALIASES = ("output_id", "input_id", "image")


class OperationInstructor:
    def __init__(self, engine: Engine, domain: str):
        self.engine = engine
        self.domain = domain
        self.operations = sorted(op.name for op in OPERATIONS.values() if op.domain == domain)
        extra = ("recommend_batch_size", "get_metrics") if domain == "inference" else ()
        self.commands = (*self.operations, *extra, "get_status")

    def run(self, operation: str, data: dict) -> dict:
        request = {k: data[k] for k in SESSION_FIELDS if k in data}
        parameters = {k: v for k, v in data.items() if k not in (*SESSION_FIELDS, "action")}
        for alias in IMAGE_ALIASES:
            if alias in parameters and "init_image" not in parameters:
                parameters["init_image"] = parameters.pop(alias)
        request["domains"] = [{"domain": self.domain, "operation": operation, "parameters": parameters}]
        return self.engine.sessions.execute(parse(ExecuteWorkflowRequest, request))

    def batch_process(self, data: dict) -> dict:
        return self.engine.batches.execute(parse(ExecuteBatchRequest, data))

    def get_status(self, data: dict) -> dict:
        """The domain's status; with a session_id or batch_id, that work's images (inference) or its
        postprocessing steps (postprocessing)."""
        work = domain_status.find_work(self.engine, parse(DomainStatusRequest, data))
        if work is not None:
            return domain_status.domain_part(self.engine, self.domain, work)
        status = self.engine.status()
        return {"operations": list(self.operations), **status[self.domain]}

    def recommend_batch_size(self, data: dict) -> dict:
        """Per device: the size the memory monitor would give the next forward of these images, and why."""
        request = parse(RecommendBatchSizeRequest, data)
        engine = self.engine
        model_id = engine.planner.model_for(request.model, "")
        own = engine.models.defaults(model_id)
        width, height = request.width or own.width, request.height or own.height
        scale = request.guidance_scale if request.guidance_scale is not None else own.guidance_scale
        guidance = request.guidance if request.guidance is not None else scale > 1.0
        key = (model_id, height, width, guidance)  # ImageSpec.forward_key: what shares one forward
        devices = {device: sizer.explain(key, request.min_batch_size, request.memory_threshold)
                   for device, sizer in engine.pool.sizers.items()}
        return {"model": model_id, "width": width, "height": height, "guidance": guidance,
                "batch_size": min(d["batch_size"] for d in devices.values()), "devices": devices}

    def get_metrics(self, data: dict) -> dict:
        """The batch manager's figures across batches (or one batch's), and each device worker's."""
        request = parse(BatchMetricsRequest, data)
        engine = self.engine
        if request.batch_id is not None:
            reply = engine.batches.status(request.batch_id, include_items=False)
            metrics = {"batch_id": request.batch_id, **reply["metrics"]}
        else:
            metrics = engine.batches.current_metrics()
        pool = engine.pool.status()
        workers = [{key: worker[key] for key in ("name", "device", "capacity", "active_images", "seconds_per_step",
                                                 "forwards", "images_done", "preemptions", "preempted_images",
                                                 "out_of_memory_events")}
                   for worker in pool["workers"]]
        return {"metrics": metrics, "workers": workers, "queued_images": pool["queued_images"]}
