"""From a request to a RunPlan: validated operations with their parameters and inputs.

Everything a request can get wrong is found here, before a session or batch
exists: unknown workflows, parameters outside the schema or the limits, an
image reference that does not resolve, a path outside the allowed roots.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Collection

from ..api.messages import parse
from ..diffusion.models import check_model_folder, model_defaults
from ..errors import InvalidRequest, NotFound
from ..outputs.postprocess import decode
from ..outputs.store import INPUT_PREFIX, OUTPUT_PREFIX
from ..workflows.operations import OPERATIONS, GenerateParams, ModelParams, StepImage

if TYPE_CHECKING:
    from ..api.messages import DomainOperation
    from ..config import WorkerConfig
    from ..diffusion.models import ModelCatalog
    from ..outputs.store import OutputStore
    from ..workflows.definition import Workflow
    from ..workflows.operations import Operation, OperationParams

IMAGE_PARAMETER = "init_image"
MAX_IMAGE_FILE_BYTES = 64 * 2**20


@dataclass
class PlannedStep:
    operation: Operation
    params: OperationParams
    inputs: list[StepImage] | None = None  # None: the previous step's images
    order: int = 0  # 1-based place in the request or workflow
    after: tuple[int, ...] = ()  # the orders of the steps it waits for (sequential: the step before it)

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
    models: dict[str, Path] = field(default_factory=dict)  # model id -> the folder the request names for it

    @property
    def run_steps(self) -> int:
        """What its run time grows with: the longest chain of steps each waiting for the one before it,
        in denoising steps (a CPU step counting as one); steps that wait for nothing run at once."""
        steps = {step.order: step for step in self.steps}
        finish: dict[int, int] = {}  # order -> when the step ends, counted from the start

        def ends(order: int) -> int:  # a model step may come after the steps waiting for it
            if order not in finish:
                step = steps[order]
                finish[order] = step.weight + max((ends(before) for before in step.after), default=0)
            return finish[order]

        return max(map(ends, steps), default=0)


class Planner:
    def __init__(self, config: WorkerConfig, models: ModelCatalog, outputs: OutputStore):
        self.config = config
        self.models = models
        self.outputs = outputs

    def for_workflow(self, workflow: Workflow, parameters: dict, prefix: str = "parameters.",
                     also_accepted: tuple[str, ...] = ()) -> RunPlan:
        """`also_accepted`: names the caller took out of `parameters` before (a batch's total_images), listed
        with the workflow's own when a name is refused."""
        values = parse(workflow.parameter_model(), parameters, prefix=prefix,
                       also_accepted=also_accepted).model_dump(exclude_none=True)
        model_id = self.model_for(values.get("model"), prefix)
        inputs = self._image_inputs(values.pop(IMAGE_PARAMETER, None), prefix + IMAGE_PARAMETER)
        steps: list[PlannedStep] = []
        for step in workflow.steps:
            if step.skip_when and step.skip_when in parameters and parameters[step.skip_when] is not None:
                continue
            operation = OPERATIONS[f"{step.domain}.{step.operation}"]
            params = self._operation_params(operation, {**operation.params.taken(values), **step.parameters}, prefix)
            self._fill_model_defaults(params, model_id, {})
            after = (steps[-1].order,) if steps else ()
            steps.append(PlannedStep(operation, params, inputs if not steps and inputs else None, step.order, after))
        self._check_inputs(steps, lambda index: prefix)
        return self._finish(RunPlan(steps, False, model_id, workflow.id), lambda step: prefix)

    def for_coordination(self, domains: list[DomainOperation], parallel: bool, workflow_id: str | None) -> RunPlan:
        """Every routed domain's operations as steps. Sequential: in order, each on the images before it.
        Parallel: at once, but for operations on a model that a model step of the same request names:
        each waits for the model steps naming its model, and for nothing else. A device step that names no model
        uses the model the request loads (the last load before it, in sequence). Model folders the request
        names are registered only when it is accepted (`register`): a refused request changes nothing."""
        limit = self.config.limits.max_operations
        if len(domains) > limit:
            raise InvalidRequest(f"domains: {len(domains)} operations, more than limits.max_operations ({limit})")
        parsed: list[tuple[Operation, OperationParams, list[StepImage]]] = []
        folders: dict[str, Path] = {}  # model id -> the folder a model step names for it
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
            if isinstance(params, ModelParams):
                self.prepare_model(params, prefix, folders)
            parsed.append((operation, params, inputs))
        batch_ids: set[str] = set()
        for index, (operation, params, _) in enumerate(parsed):
            if operation.makes_batch:
                if params.batch_id in batch_ids:
                    raise InvalidRequest(f"domains.{index}.parameters.batch_id: '{params.batch_id}' names two "
                                         f"batches of the request")
                batch_ids.add(params.batch_id)
        model_steps: dict[str, list[int]] = {}  # model id -> the orders of the model steps naming it
        for index, (_, params, _) in enumerate(parsed):
            if isinstance(params, ModelParams):
                model_steps.setdefault(params.model_id, []).append(index + 1)
        loads = {p.model_id for o, p, _ in parsed if o.qualified == "model.load_model"}
        loaded = next(iter(loads)) if parallel and len(loads) == 1 else None
        steps: list[PlannedStep] = []
        models = set()
        for index, (operation, params, inputs) in enumerate(parsed):
            if operation.qualified == "model.load_model" and not parallel:
                loaded = params.model_id
            after = () if parallel or not index else (index,)
            if operation.on_device:
                params.model = params.model or loaded
                model_id = self.model_for(params.model, f"domains.{index}.parameters.", folders)
                self._fill_model_defaults(params, model_id, folders)
                models.add(model_id)
                if parallel:
                    after = tuple(model_steps.get(params.model or self.config.default_model, ()))
            steps.append(PlannedStep(operation, params, inputs or ([] if parallel else None), index + 1, after))
        self._check_inputs(steps, lambda index: f"domains.{index}.parameters.", parallel)
        model_id = models.pop() if len(models) == 1 else self.config.default_model
        return self._finish(RunPlan(steps, parallel, model_id, workflow_id, models=folders),
                            lambda step: f"domains.{step.order - 1}.parameters.")

    def prepare_model(self, params: ModelParams, prefix: str, folders: dict[str, Path]) -> None:
        """A model a model step names. With a folder: inside the allowed roots, safetensors only, and an id
        the request may name it as (not built in or configured, not naming another folder), added to
        `folders` for `register`. Without: a known model, its folder checked."""
        if params.path:
            folder = confine_path(params.path, self.config.allowed_roots, prefix + "path")
            refusal = self.models.redefinition(params.model_id, folder)
            if refusal is None and folders.get(params.model_id, folder) != folder:
                refusal = f"the request names two folders as '{params.model_id}'"
            if refusal is not None:
                raise InvalidRequest(f"{prefix}model_id: {refusal}")
            check_model_folder(folder)
            folders[params.model_id] = folder
        elif params.model_id not in folders:
            self.model_for(params.model_id, prefix)
            self.models.folder(params.model_id)

    def _fill_model_defaults(self, params: OperationParams, model_id: str, folders: dict[str, Path]) -> None:
        """A generate operation's empty steps and guidance_scale become its model's own (`ModelDefaults`):
        SD's 20 at 7.5 are not Flux's 28 at 3.5 nor schnell's 4 unguided. Here, before the run, because
        progress and the step limits count the steps; a model's default over `limits.max_steps` runs at
        the limit. Reading them checks the model's folder: one that is missing is refused here."""
        if not isinstance(params, GenerateParams) or None not in (params.steps, params.guidance_scale):
            return
        defaults = model_defaults(folders[model_id]) if model_id in folders else self.models.defaults(model_id)
        if params.steps is None:
            params.steps = min(defaults.steps, self.config.limits.max_steps)
        if params.guidance_scale is None:
            params.guidance_scale = defaults.guidance_scale

    def register(self, plan: RunPlan) -> list[str]:
        """The model folders an accepted request names, registered as its ids (all or none); the new ids."""
        return self.models.register(plan.models)

    def _finish(self, plan: RunPlan, prefix: Callable[[PlannedStep], str]) -> RunPlan:
        self._check_image_count(plan, prefix)
        self._check_denoising_steps(plan, prefix)
        for step in plan.steps:
            if step.operation.name in ("encode", "save"):
                plan.file_format = step.params.format
                plan.file_quality = step.params.quality
        return plan

    def _check_image_count(self, plan: RunPlan, prefix: Callable[[PlannedStep], str]) -> None:
        """`limits.max_items` bounds the images one session makes, counted through its steps: in sequence
        a device step makes num_images from each image before it, in parallel the steps' images add up."""
        limit = self.config.limits.max_items
        before = total = 0
        for step in plan.steps:
            if not step.operation.on_device or step.operation.answers is not None:
                continue
            if step.inputs:
                sources = len(step.inputs)
            else:
                sources = before if step.operation.uses_images and not plan.parallel else 0
            made = step.params.num_images * max(1, sources)
            before, total = made, total + made
            counted = total if plan.parallel else made
            if counted > limit:
                raise InvalidRequest(f"{prefix(step)}num_images: the request makes {counted} images, "
                                     f"more than the limit of {limit}")

    def _check_denoising_steps(self, plan: RunPlan, prefix: Callable[[PlannedStep], str]) -> None:
        """`limits.max_denoising_steps` bounds one session's device work, summed over its operations:
        `max_steps` bounds one operation only, and a coordination may list many."""
        limit = self.config.limits.max_denoising_steps
        total = 0
        for step in plan.steps:
            if step.operation.on_device and step.operation.answers is None:
                total += step.params.steps
                if total > limit:
                    raise InvalidRequest(f"{prefix(step)}steps: the request runs {total} denoising steps by here, "
                                         f"more than limits.max_denoising_steps ({limit})")

    def _operation_params(self, operation: Operation, values: dict, prefix: str) -> OperationParams:
        return parse(operation.params, values, prefix=prefix, context={"limits": self.config.limits})

    def model_for(self, model_id: Any, prefix: str, named: Collection[str] = ()) -> str:
        """A known model id (the default one when none is given), or an invalid_request naming the field;
        `named`: the ids the request itself names folders for."""
        model_id = model_id or self.config.default_model
        if model_id in named:
            return model_id
        try:
            self.models.entry(model_id)
        except NotFound:
            raise InvalidRequest(f"{prefix}model: unknown model '{model_id}'") from None
        return model_id

    def _check_inputs(self, steps: list[PlannedStep], prefix: Callable[[int], str], parallel: bool = False) -> None:
        """Operations that need an image get one: their own, or (in sequence) one a step before it made."""
        images_before = False
        for index, step in enumerate(steps):
            if step.operation.needs_input and not step.inputs and (parallel or not images_before):
                raise InvalidRequest(f"{prefix(index)}{IMAGE_PARAMETER}: '{step.label}' needs an input image")
            images_before = images_before or step.operation.on_device or bool(step.inputs)

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
        data = read_image_file(path, field_name)
        try:
            pixels, metadata = decode(data)
        except Exception as error:  # Pillow raises many kinds for many broken files
            raise InvalidRequest(f"{field_name}: {path} is not a readable image ({type(error).__name__})") from None
        return [StepImage(pixels, None, metadata)]


def read_image_file(path: Path, field_name: str) -> bytes:
    """A regular file's bytes, up to MAX_IMAGE_FILE_BYTES; a FIFO, a device or a folder is refused
    without blocking on it."""
    try:
        handle = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as error:
        raise InvalidRequest(f"{field_name}: cannot read {path}: {error.strerror}") from None
    try:
        info = os.fstat(handle)
        if not stat.S_ISREG(info.st_mode):
            raise InvalidRequest(f"{field_name}: {path} is not a regular file")
        if info.st_size > MAX_IMAGE_FILE_BYTES:
            raise InvalidRequest(f"{field_name}: {path} is larger than {MAX_IMAGE_FILE_BYTES} bytes")
        with os.fdopen(handle, "rb", closefd=False) as file:
            return file.read(MAX_IMAGE_FILE_BYTES + 1)
    finally:
        os.close(handle)


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

