"""From a request to a RunPlan: validated operations with their parameters and inputs.

Everything a request can get wrong is found here, before a session or batch
exists: unknown workflows, parameters outside the schema or the limits, an
image reference that does not resolve, a path outside the allowed roots.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .config import WorkerConfig
from .diffusion.models import ModelCatalog
from .errors import InvalidRequest, NotFound
from .operations import OPERATIONS, Operation, OperationParams, StepImage
from .outputs import INPUT_PREFIX, OUTPUT_PREFIX, OutputStore
from .postprocess import decode
from .protocol import DomainOperation, parse
from .workflows.definition import Workflow

IMAGE_PARAMETER = "init_image"


@dataclass
class PlannedStep:
    operation: Operation
    params: OperationParams
    inputs: list[StepImage] | None = None  # None: the previous step's images

    @property
    def label(self) -> str:
        return self.operation.qualified

    @property
    def weight(self) -> int:
        """Its share of a run's progress: denoising steps dominate, a CPU step counts as one."""
        return getattr(self.params, "steps", 1) if self.operation.on_device else 1


@dataclass
class RunPlan:
    steps: list[PlannedStep]
    parallel: bool
    model_id: str
    workflow_id: str | None
    file_format: str = "png"
    file_quality: int = 90


class Planner:
    def __init__(self, config: WorkerConfig, models: ModelCatalog, outputs: OutputStore):
        self.config = config
        self.models = models
        self.outputs = outputs

    def for_workflow(self, workflow: Workflow, parameters: dict, prefix: str = "parameters.") -> RunPlan:
        values = parse(workflow.parameter_model(), parameters, prefix=prefix).model_dump(exclude_none=True)
        model_id = self._model(values.get("model"), prefix)
        inputs = self._image_inputs(values.pop(IMAGE_PARAMETER, None), prefix + IMAGE_PARAMETER)
        steps: list[PlannedStep] = []
        for step in workflow.steps:
            if step.skip_when and step.skip_when in parameters and parameters[step.skip_when] is not None:
                continue
            operation = OPERATIONS[f"{step.domain}.{step.operation}"]
            params = self._operation_params(operation, {**values, **step.parameters}, prefix)
            steps.append(PlannedStep(operation, params, inputs if not steps and inputs else None))
        self._check_inputs(steps, lambda index: prefix)
        return self._finish(RunPlan(steps, False, model_id, workflow.id))

    def for_coordination(self, domains: list[DomainOperation], parallel: bool, workflow_id: str | None) -> RunPlan:
        steps: list[PlannedStep] = []
        models = set()
        for index, item in enumerate(domains):
            prefix = f"domains.{index}.parameters."
            operation = OPERATIONS.get(f"{item.domain}.{item.operation}")
            if operation is None:
                known = ", ".join(sorted(OPERATIONS))
                raise InvalidRequest(f"domains.{index}.operation: unknown operation "
                                     f"'{item.domain}.{item.operation}' (known: {known})")
            values = dict(item.parameters)
            inputs = self._image_inputs(values.pop(IMAGE_PARAMETER, None), prefix + IMAGE_PARAMETER)
            params = self._operation_params(operation, values, prefix)
            if operation.on_device:
                models.add(self._model(values.get("model"), prefix))
            steps.append(PlannedStep(operation, params, inputs or ([] if parallel else None)))
        self._check_inputs(steps, lambda index: f"domains.{index}.parameters.", parallel)
        model_id = models.pop() if len(models) == 1 else self.config.default_model
        return self._finish(RunPlan(steps, parallel, model_id, workflow_id))

    def _finish(self, plan: RunPlan) -> RunPlan:
        for step in plan.steps:
            if step.operation.name in ("encode", "save"):
                plan.file_format = step.params.format
                plan.file_quality = step.params.quality
        return plan

    def _operation_params(self, operation: Operation, values: dict, prefix: str) -> OperationParams:
        return parse(operation.params, values, prefix=prefix, context={"limits": self.config.limits})

    def _model(self, model_id: Any, prefix: str) -> str:
        model_id = model_id or self.config.default_model
        try:
            self.models.entry(model_id)
        except NotFound:
            raise InvalidRequest(f"{prefix}model: unknown model '{model_id}'") from None
        return model_id

    def _check_inputs(self, steps: list[PlannedStep], prefix: Callable[[int], str], parallel: bool = False) -> None:
        """Operations that need an image get one: their own, or (in sequence) the previous step's."""
        for index, step in enumerate(steps):
            first = index == 0 or parallel
            if step.operation.needs_input and first and not step.inputs:
                raise InvalidRequest(f"{prefix(index)}{IMAGE_PARAMETER}: '{step.label}' needs an input image")

    def _image_inputs(self, reference: Any, field_name: str) -> list[StepImage]:
        """An image parameter: an output id, an input id, or a file inside the allowed roots."""
        if reference is None:
            return []
        if not isinstance(reference, str) or not reference.strip():
            raise InvalidRequest(f"{field_name}: must be an output_id, an input_id or a file path")
        reference = reference.strip()
        try:
            if reference.startswith(OUTPUT_PREFIX):
                buffer = self.outputs.get(reference)
                return [StepImage(buffer.pixels, buffer.seed, dict(buffer.metadata))]
            if reference.startswith(INPUT_PREFIX):
                return [StepImage(self.outputs.get_input(reference))]
        except NotFound as error:
            raise InvalidRequest(f"{field_name}: {error.message}") from None
        path = confine_path(reference, self.config.allowed_roots, field_name)
        try:
            data = path.read_bytes()
        except OSError as error:
            raise InvalidRequest(f"{field_name}: cannot read {path}: {error.strerror}") from None
        try:
            pixels, metadata = decode(data)
        except Exception as error:  # Pillow raises many kinds for many broken files
            raise InvalidRequest(f"{field_name}: {path} is not a readable image ({type(error).__name__})") from None
        return [StepImage(pixels, None, metadata)]


def confine_path(text: str, roots: list[Path], field_name: str) -> Path:
    """`text` resolved (symlinks followed) strictly inside one of `roots`, or refused."""
    if not roots:
        raise InvalidRequest(f"{field_name}: file paths are refused: no allowed_roots are configured")
    if "\x00" in text:
        raise InvalidRequest(f"{field_name}: invalid path")
    resolved = Path(text).expanduser().resolve()
    for root in roots:
        if resolved.is_relative_to(Path(root).expanduser().resolve()):
            return resolved
    raise InvalidRequest(f"{field_name}: path '{text}' is outside the allowed roots")

