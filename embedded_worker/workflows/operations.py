"""The operations a workflow step or a coordination request can name.

Each operation states its parameters as a pydantic model (the limits from the
worker configuration arrive as validation context) and is one of three kinds:
a device operation, which turns parameters into images to denoise; a CPU
operation, which turns images into images on the postprocessing pool; or an
answering operation (model load/unload, device status), which acts on the
device side and answers with a result of its own while the images pass
through it unchanged.
"""

from __future__ import annotations

import functools
import random
import uuid
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Literal

import numpy as np
from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    StrictInt,
    ValidationInfo,
    field_validator,
    model_validator,
)

from ..api import device_answers
from ..api.field_names import spellings
from ..api.messages import MAX_SEED, BatchConfiguration, ExecuteBatchRequest, Id, Number, one_batch_count
from ..config import Limits
from ..diffusion.device_pool import DevicePool
from ..diffusion.image_spec import ImageSpec
from ..diffusion.schedulers import DEFAULT_SCHEDULER, SCHEDULERS
from ..errors import InvalidRequest
from ..outputs import postprocess

SchedulerName = Literal[tuple([DEFAULT_SCHEDULER, *SCHEDULERS])]  # type: ignore[valid-type]


@dataclass
class StepImage:
    """An image between steps, with what made it (for metadata and output references)."""

    pixels: np.ndarray
    seed: int | None = None
    metadata: dict = field(default_factory=dict)


def _limits(info: ValidationInfo) -> Limits:
    return (info.context or {}).get("limits") or Limits()


class OperationParams(BaseModel):
    """An operation's parameters: a name it does not take is refused (`protocol.parse`), never dropped."""

    model_config = ConfigDict(extra="forbid")

    @classmethod
    def taken(cls, values: dict) -> dict:
        """The values this operation takes, of a workflow's parameters (which serve all of its steps)."""
        names = spellings(cls)
        return {name: value for name, value in values.items() if name in names}


class GenerateParams(OperationParams):
    prompt: str = Field(..., min_length=1)
    negative_prompt: str = ""
    seed: StrictInt | None = Field(None, ge=0, le=MAX_SEED, description="none: a random seed, reported back")
    # none: the model's own (`ModelDefaults`), filled in when the request is planned and its model known
    steps: StrictInt | None = Field(None, ge=1, description="none: the model's own, at most limits.max_steps")
    guidance_scale: Number | None = Field(None, ge=0, le=50, description="none: the model's own")
    width: StrictInt | None = Field(None, ge=8, description="none: the model's native size")
    height: StrictInt | None = Field(None, ge=8)
    num_images: StrictInt = Field(1, ge=1)
    scheduler: SchedulerName = DEFAULT_SCHEDULER
    model: str | None = None

    @field_validator("prompt", "negative_prompt")
    @classmethod
    def _prompt_length(cls, value: str, info: ValidationInfo) -> str:
        limit = _limits(info).max_prompt_chars
        if len(value) > limit:
            raise ValueError(f"{len(value)} characters exceed the limit of {limit}")
        return value

    @field_validator("steps")
    @classmethod
    def _steps_limit(cls, value: int | None, info: ValidationInfo) -> int | None:
        limit = _limits(info).max_steps
        if value is not None and value > limit:
            raise ValueError(f"{value} exceeds the limit of {limit} steps")
        return value

    @field_validator("width", "height")
    @classmethod
    def _side_limit(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is None:
            return value
        limit = _limits(info).max_image_side
        if value > limit:
            raise ValueError(f"{value} exceeds the limit of {limit} pixels")
        if value % 8:
            raise ValueError(f"{value} is not a multiple of 8")
        return value

    @field_validator("num_images")
    @classmethod
    def _count_limit(cls, value: int, info: ValidationInfo) -> int:
        limit = _limits(info).max_items
        if value > limit:
            raise ValueError(f"{value} exceeds the limit of {limit} images")
        return value

    @model_validator(mode="after")
    def _seeds_fit(self) -> "GenerateParams":
        """Image i gets seed + i, and every seed is stored as a signed 64-bit integer."""
        if self.seed is not None and self.seed + self.num_images - 1 > MAX_SEED:
            raise ValueError(f"seed: seed + num_images - 1 must not exceed {MAX_SEED}")
        return self


class BatchProcessParams(GenerateParams):
    """inference.batch_process as a step: `{batch_id?, batch_config, generation_params}` (or `parameters`).

    Checked here like any generation (limits, one image count); run as the
    batch `execute_batch` makes of the same request (`batch_request`), a child
    of the session: `batch_config.total_images` items, item i with seed + i.
    """

    batch_id: Id = Field(default_factory=lambda: f"coordination-batch-{uuid.uuid4()}",
                         description="the child batch's id; none: one of its own, reported in the step's result")
    configuration: BatchConfiguration = Field(default_factory=BatchConfiguration)

    @model_validator(mode="before")
    @classmethod
    def _flatten(cls, data: Any) -> Any:
        data = one_batch_count(data)
        if not isinstance(data, dict):
            return data
        generation = data.get("generation_params", data.get("parameters"))
        configuration = data.get("batch_config", data.get("configuration"))
        flat = {k: v for k, v in data.items()
                if k not in ("generation_params", "parameters", "batch_config", "configuration")}
        if isinstance(generation, dict):
            flat.update(generation)
        elif generation is not None:
            raise ValueError("generation_params: must be an object")
        if configuration is not None:
            flat["configuration"] = configuration
            count = configuration.get("total_images") if isinstance(configuration, dict) else None
            if count is not None:
                if "num_images" in flat and flat["num_images"] != count:
                    raise ValueError(f"batch_config.total_images ({count!r}) and generation_params.num_images "
                                     f"({flat['num_images']!r}) disagree: give one image count")
                flat["num_images"] = count
        flat.pop("total_images", None)  # now in the configuration, and so in num_images
        return flat

    def batch_request(self, priority: int) -> ExecuteBatchRequest:
        """The step as the request the facade's own inference.batch_process is: one batch path for both."""
        generation = self.model_dump(include=set(GenerateParams.model_fields) - {"num_images"}, exclude_none=True)
        return ExecuteBatchRequest(batch_id=self.batch_id, parameters=generation, configuration=self.configuration,
                                   priority=priority)


class ModelParams(OperationParams):
    model_id: Id = Field(validation_alias=AliasChoices("model_id", "model", "model_name"))
    path: str | None = Field(None, description="a model folder inside the allowed roots, registered as model_id")


class DeviceParams(OperationParams):
    """Device steps take no parameters: they report."""


class Img2ImgParams(GenerateParams):
    strength: float = Field(0.75, gt=0, le=1)


class UpscaleParams(OperationParams):
    factor: Literal[2, 4] = 2
    _max_side: int = PrivateAttr(Limits().max_image_side)  # the input's size is known only when it runs

    @field_validator("factor", mode="before")
    @classmethod
    def _from_number(cls, value: Any) -> Any:
        return int(value) if isinstance(value, float) and value.is_integer() else value

    @model_validator(mode="after")
    def _keep_limit(self, info: ValidationInfo) -> "UpscaleParams":
        self._max_side = _limits(info).max_image_side
        return self


class ResizeParams(OperationParams):
    width: StrictInt = Field(..., ge=1)
    height: StrictInt = Field(..., ge=1)

    @field_validator("width", "height")
    @classmethod
    def _side_limit(cls, value: int, info: ValidationInfo) -> int:
        limit = _limits(info).max_image_side
        if value > limit:
            raise ValueError(f"{value} exceeds the limit of {limit} pixels")
        return value


class EnhanceParams(OperationParams):
    sharpness: float = Field(1.0, ge=0, le=5)
    contrast: float = Field(1.1, ge=0, le=3)
    color: float = Field(1.0, ge=0, le=3)


class EncodeParams(OperationParams):
    format: Literal["png", "jpeg", "webp"] = "png"
    quality: StrictInt = Field(90, ge=1, le=100)


class SaveParams(OperationParams):
    format: Literal["png", "jpeg", "webp"] = "png"
    quality: StrictInt = Field(90, ge=1, le=100)


@dataclass(frozen=True)
class Operation:
    domain: str
    name: str
    params: type[OperationParams]
    on_device: bool
    description: str
    run: Callable[[Any, list[StepImage]], list[StepImage]] | None = None  # CPU operations
    needs_input: bool = False
    answers: Callable[[Any, DevicePool], dict] | None = None  # answering operations: their result
    uses_images: bool = True  # a device operation: the images before it become its init images
    makes_batch: bool = False  # its images are a batch of their own (`lifecycle.child_batch`)

    @functools.cached_property
    def qualified(self) -> str:
        """Made once: every status poll names the step under way with it (a new string each time cost 0.3 us,
        and a host reads a string Python keeps without a C API call)."""
        return f"{self.domain}.{self.name}"


def image_specs(
    params: GenerateParams, inputs: list[StepImage], model_id: str, native: tuple[int, int]
) -> list[ImageSpec]:
    """The images a generate operation asks for: seed + i for image i (steps and guidance planned in)."""
    seed = params.seed if params.seed is not None else random.SystemRandom().randrange(2**32)
    width = params.width or native[0]
    height = params.height or native[1]
    init_images = [image.pixels for image in inputs] or [None]
    base = ImageSpec(
        model_id=model_id,
        prompt=params.prompt,
        negative_prompt=params.negative_prompt,
        seed=seed,
        steps=params.steps,
        guidance_scale=params.guidance_scale,
        width=width,
        height=height,
        scheduler=params.scheduler,
        strength=getattr(params, "strength", 1.0),
    )
    specs = []
    for index in range(params.num_images * len(init_images)):
        init = init_images[index % len(init_images)]
        specs.append(replace(base, seed=seed + index, init_image=_rgb(init) if init is not None else None))
    return specs


def _rgb(pixels: np.ndarray) -> np.ndarray:
    if pixels.shape[2] == 3:
        return pixels
    if pixels.shape[2] == 4:
        return np.ascontiguousarray(pixels[:, :, :3])
    return np.ascontiguousarray(np.repeat(pixels, 3, axis=2))


def _each(fn: Callable[[np.ndarray], np.ndarray]) -> Callable[[list[StepImage]], list[StepImage]]:
    return lambda images: [replace(image, pixels=fn(image.pixels)) for image in images]


def _upscale(params: UpscaleParams, images: list[StepImage]) -> list[StepImage]:
    for image in images:
        height, width = image.pixels.shape[:2]
        if max(height, width) * params.factor > params._max_side:
            raise InvalidRequest(f"upscale: {width}x{height} x{params.factor} exceeds the limit of "
                                 f"{params._max_side} pixels a side")
    return _each(lambda p: postprocess.upscale(p, params.factor))(images)


def _resize(params: ResizeParams, images: list[StepImage]) -> list[StepImage]:
    return _each(lambda p: postprocess.resize(p, params.width, params.height))(images)


def _enhance(params: EnhanceParams, images: list[StepImage]) -> list[StepImage]:
    return _each(lambda p: postprocess.enhance(p, params.sharpness, params.contrast, params.color))(images)


def _pass_through(params: OperationParams, images: list[StepImage]) -> list[StepImage]:
    """encode and save change no pixels: the run writes files in the step's format when it saves."""
    return images


OPERATIONS: dict[str, Operation] = {
    op.qualified: op
    for op in (
        Operation("inference", "text2img", GenerateParams, True, "generate images from a prompt"),
        Operation("inference", "img2img", Img2ImgParams, True, "redraw an input image guided by a prompt",
                  needs_input=True),
        Operation("postprocessing", "upscale", UpscaleParams, False, "enlarge x2 or x4 (Lanczos)", _upscale, True),
        Operation("postprocessing", "resize", ResizeParams, False, "resize to a size (Lanczos)", _resize, True),
        Operation("postprocessing", "enhance", EnhanceParams, False, "sharpen, contrast and colour", _enhance, True),
        Operation("postprocessing", "encode", EncodeParams, False, "choose the file format of saved outputs",
                  _pass_through, True),
        Operation("postprocessing", "save", SaveParams, False, "keep the images as outputs (files when configured)",
                  _pass_through, True),
        Operation("inference", "batch_process", BatchProcessParams, True,
                  "batch_config.total_images images from generation_params, seeds seed + i, as a batch",
                  uses_images=False, makes_batch=True),
        Operation("model", "load_model", ModelParams, False, "load a model on every device worker",
                  answers=lambda params, pool: device_answers.load_model(pool, params.model_id)),
        Operation("model", "unload_model", ModelParams, False, "unload a model from every device worker",
                  answers=lambda params, pool: device_answers.unload_model(pool, params.model_id)),
        Operation("device", "get_status", DeviceParams, False, "the device workers, their memory and queue",
                  answers=lambda params, pool: device_answers.device_status(pool)),
        Operation("device", "get_memory", DeviceParams, False, "each device's memory",
                  answers=lambda params, pool: device_answers.device_memory(pool)),
        Operation("device", "list_devices", DeviceParams, False, "the devices and their workers",
                  answers=lambda params, pool: device_answers.list_devices(pool)),
    )
}

