"""StepWork: one launched step of a run, what it has in flight and how it ended; and how steps are told.

A run keeps a StepWork per step it launched: the images it sent to a
device or the function it gave the CPU pool, then the images it made or its
error. The helpers turn steps into the `step_results` of a status reply,
several failures into one error naming each, and an image's spec into the
metadata its output files carry.
"""

from __future__ import annotations

import logging
import time
import traceback
from concurrent.futures import CancelledError, Future
from typing import TYPE_CHECKING, Protocol

from ..api.messages import iso
from ..errors import Cancelled, InternalError, WorkerError

if TYPE_CHECKING:
    from ..diffusion.task import DenoiseTask
    from ..workflows.operations import StepImage
    from .planning import PlannedStep, RunPlan

log = logging.getLogger("embedded_worker.runner")


class SteeredBatch(Protocol):
    """A batch_process step's batch as its run steers it (`child_batch.ChildBatch`)."""

    @property
    def parked(self) -> bool: ...

    def pause(self) -> None: ...

    def resume(self) -> None: ...

    def cancel(self) -> None: ...


class StepWork:
    """What one launched step has in flight (its images on the device or its CPU future), then how it ended."""

    def __init__(self, step: PlannedStep):
        self.step = step
        self.tasks: list[DenoiseTask] = []
        self.cpu: Future | None = None
        self.settled = False
        self.results: list[StepImage] | None = None  # until the run takes them for the next step
        self.error: WorkerError | None = None
        self.images_made = 0
        self.answer: dict | None = None  # what an answering step (model, device) said; a batch step: its id
        self.child: SteeredBatch | None = None  # a batch_process step's batch, once it joined
        self.started_at = time.time()
        self.finished_at: float | None = None

    @property
    def completed(self) -> bool:
        return self.settled and self.error is None

    @property
    def fraction(self) -> float:
        if self.settled:
            return 1.0
        if self.tasks:
            return sum(t.progress for t in self.tasks) / len(self.tasks)
        return 0.0

    @property
    def eta_seconds(self) -> float | None:
        etas = [t.eta_seconds for t in self.tasks if t.eta_seconds is not None]
        return max(etas) if etas else None


def describe_steps(steps: list[PlannedStep], launched: dict[int, StepWork], ended: bool, paused: bool) -> list[dict]:
    """Each step in request order: its status, the images it made, what an answering step said."""
    results = []
    for step in steps:
        work = launched.get(step.order)
        if work is None:
            status = "cancelled" if ended else "waiting"
        elif work.error is not None:
            status = "cancelled" if work.error.code == "cancelled" else "failed"
        elif work.settled:
            status = "completed"
        elif ended:
            status = "cancelled"
        else:
            status = "paused" if paused else "running"
        results.append({
            "order": step.order, "domain": step.operation.domain, "operation": step.operation.name,
            "status": status,
            "images": work.images_made if work is not None and work.settled else len(work.tasks) if work else 0,
            "result": work.answer if work is not None else None,
            "error": work.error.message if work is not None and work.error is not None else None,
            "started_at": iso(work.started_at) if work is not None else None,
            "completed_at": iso(work.finished_at) if work is not None else None,
        })
    return results


def aggregate_errors(failures: list[tuple[PlannedStep, WorkerError]]) -> WorkerError:
    """One error naming every failed operation: its domain, operation, message and code."""
    details = [
        {"domain": step.operation.domain, "operation": step.operation.name, "error": error.message,
         "error_code": error.code}
        for step, error in failures
    ]
    message = "; ".join(f"{d['domain']}.{d['operation']}: {d['error']}" for d in details)
    kinds = {type(error) for _, error in failures}
    kind = kinds.pop() if len(kinds) == 1 else InternalError
    return kind(message, details=details)


def image_metadata(task: DenoiseTask, plan: RunPlan) -> dict:
    """What made the image, for output files and `output_info`; absent values are left out."""
    spec = task.spec
    metadata = {
        "prompt": spec.prompt,
        "negative_prompt": spec.negative_prompt,
        "seed": spec.seed,
        "steps": spec.steps,
        "guidance_scale": spec.guidance_scale,
        "scheduler": spec.scheduler,
        "width": spec.width,
        "height": spec.height,
        "model": spec.model_id,
        "workflow": plan.workflow_id,
        "strength": spec.strength if spec.init_image is not None else None,
    }
    return {key: value for key, value in metadata.items() if value is not None}


def resumed_from_step(tasks: list[DenoiseTask]) -> int | None:
    """The earliest step a run's images continued from after a restart (None: none continued)."""
    steps = [t.resumed_from_step for t in tasks if t.resumed_from_step is not None]
    return min(steps) if steps else None


def as_worker_error(error: BaseException | None) -> WorkerError:
    if isinstance(error, WorkerError):
        return error
    if error is None:
        return Cancelled("cancelled")
    if isinstance(error, CancelledError):
        return Cancelled("cancelled")
    trace = "".join(traceback.format_exception(error, limit=-3)).strip()
    log.error("step failed: %s", trace)
    return InternalError(f"{type(error).__name__}: {error}", details={"traceback": trace})

