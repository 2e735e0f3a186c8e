"""Schedulers a request may name, made fresh per cohort so their state belongs to that cohort alone."""

from __future__ import annotations

import functools
import inspect
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

SCHEDULERS = {
    "pndm": "PNDMScheduler",
    "ddim": "DDIMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "dpmpp_2m": "DPMSolverMultistepScheduler",
    "unipc": "UniPCMultistepScheduler",
    "heun": "HeunDiscreteScheduler",
}
DEFAULT_SCHEDULER = "default"  # the one the model folder ships with


def make_scheduler(pipe, name: str):
    """A fresh scheduler instance of `name`, configured like the model's own."""
    if name == DEFAULT_SCHEDULER:
        return type(pipe.scheduler).from_config(pipe.scheduler.config)
    import diffusers

    return getattr(diffusers, SCHEDULERS[name]).from_config(pipe.scheduler.config)


@functools.cache
def _step_parameters(scheduler_class: type) -> frozenset[str]:
    """What a scheduler class's `step` accepts: looked up once per class, not at every step."""
    return frozenset(inspect.signature(scheduler_class.step).parameters)


def step_kwargs(scheduler, generators: list[torch.Generator]) -> dict:
    accepted = _step_parameters(type(scheduler))
    kwargs = {}
    if "eta" in accepted:
        kwargs["eta"] = 0.0
    if "generator" in accepted:
        kwargs["generator"] = generators
    return kwargs
