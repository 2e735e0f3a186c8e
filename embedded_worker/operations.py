"""The operations a workflow step or a coordination request can name.

Each operation states its parameters as a pydantic model (the limits from the
worker configuration arrive as validation context) and is either a device
operation, which turns parameters into images to denoise, or a CPU
operation, which turns images into images on the postprocessing pool.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from . import postprocess
from .config import Limits
from .diffusion.denoise import DEFAULT_SCHEDULER, SCHEDULERS, ImageSpec

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
    model_config = ConfigDict(extra="ignore")


class GenerateParams(OperationParams):
    prompt: str = Field(..., min_length=1)
    negative_prompt: str = ""
    seed: int | None = Field(None, ge=0, le=2**63 - 1, description="none: a random seed, reported back")
    steps: int = Field(20, ge=1)
    guidance_scale: float = Field(7.5, ge=0, le=50)
    width: int | None = Field(None, ge=8, description="none: the model's native size")
    height: int | None = Field(None, ge=8)
    num_images: int = Field(1, ge=1)
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
    def _steps_limit(cls, value: int, info: ValidationInfo) -> int:
        limit = _limits(info).max_steps
        if value > limit:
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


class Img2ImgParams(GenerateParams):
    strength: float = Field(0.75, gt=0, le=1)


class UpscaleParams(OperationParams):
    factor: Literal[2, 4] = 2

    @field_validator("factor", mode="before")
    @classmethod
    def _from_number(cls, value: Any) -> Any:
        return int(value) if isinstance(value, float) and value.is_integer() else value


class ResizeParams(OperationParams):
    width: int = Field(..., ge=1)
    height: int = Field(..., ge=1)

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
    quality: int = Field(90, ge=1, le=100)


class SaveParams(OperationParams):
    format: Literal["png", "jpeg", "webp"] = "png"
    quality: int = Field(90, ge=1, le=100)


@dataclass(frozen=True)
class Operation:
    domain: str
    name: str
    params: type[OperationParams]
    on_device: bool
    description: str
    run: Callable[[Any, list[StepImage]], list[StepImage]] | None = None  # CPU operations
    needs_input: bool = False

    @property
    def qualified(self) -> str:
        return f"{self.domain}.{self.name}"


def image_specs(
    params: GenerateParams, inputs: list[StepImage], model_id: str, native: tuple[int, int]
) -> list[ImageSpec]:
    """The images a generate operation asks for: seed + i for image i."""
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
    )
}

