"""One session's or batch's part in each domain: what the C# side aggregates into its session.

`get_status {session_id | batch_id, domains}` sent to a domain answers that
work's part there: model, the models it uses and where they are (loaded,
loading, failed and why); inference, where each of its images is (queued,
on a device at step k of n, parked, done) and when the work should end;
postprocessing, how far each of its postprocessing steps is; device, where
its images run and the memory their forwards need. The facade's own
`get_status` puts the parts of the domains asked for into one reply.
Everything here only reads: runs, tasks and workers are read as status
calls read them elsewhere, without stopping the device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from ..diffusion.task import ACTIVE, DONE, NEW, PARKED, QUEUED
from ..errors import Cancelled
from ..workflows.operations import ModelParams
from . import device_answers
from .messages import DOMAINS

if TYPE_CHECKING:
    from ..diffusion.task import DenoiseTask
    from ..engine import Engine
    from ..lifecycle.run import WorkflowRun
    from .messages import DomainStatusRequest

IMAGE_STATES = {NEW: "queued", QUEUED: "queued", ACTIVE: "on_device", PARKED: "parked"}
STEP_STATES = ("completed", "running", "paused", "waiting", "failed", "cancelled")


@dataclass
class Work:
    kind: str  # "session" or "batch"
    id: str
    summary: dict  # its own status reply, envelope fields left out
    runs: list[WorkflowRun]

    def header(self) -> dict:
        return {f"{self.kind}_id": self.id, "status": self.summary["status"], "progress": self.summary["progress"]}


def find_work(engine: "Engine", request: DomainStatusRequest) -> Work | None:
    """The session or batch the request names (NotFound when unknown); None when it names none."""
    if request.session_id is not None:
        record, run = engine.sessions.run_of(request.session_id)
        # a coordination's batch_process step runs as a child batch: its items' images are the session's too
        children = [batch.id for batch in list(engine.book.batches.values()) if batch.session_id == record.id]
        runs = [run] if run else []
        runs += [item_run for batch_id in children for item_run in engine.batches.runs_of(batch_id)[1]]
        return Work("session", record.id, _summary(engine.sessions.describe(record)), runs)
    if request.batch_id is not None:
        record, runs = engine.batches.runs_of(request.batch_id)
        return Work("batch", record.id, _summary(engine.batches.describe(record, include_items=False)), runs)
    return None


def _summary(reply: dict) -> dict:
    return {key: value for key, value in reply.items() if key != "success"}


def domain_part(engine: "Engine", domain: str, work: Work) -> dict:
    """One domain's answer about `work`."""
    return {"domain": domain, **work.header(), **PARTS[domain](engine, work)}


def aggregate(engine: "Engine", request: DomainStatusRequest, work: Work) -> dict:
    """Every domain asked for (all of them by default) in one reply; `processing` is the work's own status."""
    domains = request.domains or [*DOMAINS, "processing"]
    parts = {domain: (work.summary if domain == "processing" else domain_part(engine, domain, work))
             for domain in dict.fromkeys(domains)}
    return {**work.header(), "domains": parts}


# ---- the parts -------------------------------------------------------------------------------


def model_part(engine: "Engine", work: Work) -> dict:
    used: dict[str, list[str]] = {}  # model id -> the operations of the work that use it
    for run in work.runs:
        for step in run.plan.steps:
            if isinstance(step.params, ModelParams):
                model_id = step.params.model_id
            elif step.operation.on_device:
                model_id = step.params.model or run.plan.model_id
            else:
                continue
            operations = used.setdefault(model_id, [])
            if step.label not in operations:
                operations.append(step.label)
    loaded = device_answers.loaded_models(engine.pool)
    models = []
    for model_id, operations in used.items():
        loading = [w.name for w in engine.pool.workers if w.loading == model_id]
        errors = [w.load_errors[model_id] for w in engine.pool.workers if model_id in w.load_errors]
        if loading:
            state = "loading"
        elif loaded.get(model_id):
            state = "loaded"
        else:
            state = "failed" if errors else "not_loaded"
        models.append({"model_id": model_id, "state": state, "loaded_on": loaded.get(model_id, []),
                       "loading_on": loading, "error": errors[0] if errors else None, "operations": operations})
    return {"models": models}


def _image_state(task: DenoiseTask) -> str:
    if task.state != DONE or not task.future.done():
        return IMAGE_STATES.get(task.state, "on_device")
    if task.future.cancelled() or isinstance(task.future.exception(), Cancelled):
        return "cancelled"
    return "failed" if task.future.exception() is not None else "done"


def inference_part(engine: "Engine", work: Work) -> dict:
    images = []
    for run in work.runs:
        for task in list(run.all_tasks):
            state = _image_state(task)
            images.append({"seed": task.spec.seed, "state": state, "step": task.step,
                           "total_steps": task.total_steps, "model": task.spec.model_id,
                           "width": task.spec.width, "height": task.spec.height, "worker": task.worker,
                           "eta_seconds": task.eta_seconds if state in ("queued", "on_device") else None})
    counts = {state: 0 for state in ("queued", "on_device", "parked", "done", "failed", "cancelled")}
    for image in images:
        counts[image["state"]] += 1
    steps_waiting = sum(1 for run in work.runs for step in run.plan.steps
                        if step.operation.on_device and step.order not in run.launched)
    return {"images": images, "counts": counts, "device_steps_waiting": steps_waiting,
            "eta_seconds": work.summary.get("eta_seconds", work.summary.get("detailed_progress", {})
                                            .get("eta_seconds"))}


def postprocessing_part(engine: "Engine", work: Work) -> dict:
    steps: dict[int, dict] = {}
    for run in work.runs:
        for result in run.step_results():
            if result["domain"] != "postprocessing":
                continue
            entry = steps.setdefault(result["order"], {"order": result["order"], "operation": result["operation"],
                                                       **{state: 0 for state in STEP_STATES}})
            entry[result["status"]] += 1
    for entry in steps.values():  # one word for the step: the most pressing of its runs' states
        entry["status"] = next((s for s in ("failed", "running", "paused", "waiting", "cancelled") if entry[s]),
                               "completed")
    return {"steps": [steps[order] for order in sorted(steps)]}


def device_part(engine: "Engine", work: Work) -> dict:
    workers = {worker.name: worker for worker in engine.pool.workers}
    placement: dict[str, dict] = {}
    for run in work.runs:
        for task in list(run.all_tasks):
            if task.state not in (ACTIVE, PARKED) or task.worker not in workers:
                continue
            device = str(workers[task.worker].device)
            entry = placement.setdefault(task.worker, {"worker": task.worker, "device": device, "images_on_device": 0,
                                                       "images_parked": 0, "forward_bytes_estimate": 0})
            if task.state == PARKED:
                entry["images_parked"] += 1
                continue
            entry["images_on_device"] += 1
            cost = engine.pool.monitors[device].cost_per_image(task.spec.forward_key())
            entry["forward_bytes_estimate"] += int(cost or 0)  # learned from earlier forwards of this kind
    devices = sorted({entry["device"] for entry in placement.values()})
    memory = engine.pool.status()["memory"]
    return {"workers": list(placement.values()), "devices": devices,
            "images_on_device": sum(e["images_on_device"] for e in placement.values()),
            "forward_bytes_estimate": sum(e["forward_bytes_estimate"] for e in placement.values()),
            "memory": {device: memory[device] for device in devices}}


PARTS: dict[str, Callable[["Engine", Work], dict]] = {
    "model": model_part,
    "inference": inference_part,
    "postprocessing": postprocessing_part,
    "device": device_part,
}
