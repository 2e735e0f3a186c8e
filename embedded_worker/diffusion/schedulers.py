"""Schedulers a request may name, made fresh per cohort so their state belongs to that cohort alone."""

from __future__ import annotations

import copy
import functools
import inspect
import weakref
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
_FRESH: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # pipe -> {name: a scheduler never stepped}


def make_scheduler(pipe, name: str):
    """A fresh scheduler instance of `name`, configured like the model's own: a copy of one made from the
    config once per pipe (`from_config` took 0.6-1.5 ms of the device thread at every cohort start, a copy
    0.2 ms)."""
    made = _FRESH.setdefault(pipe, {})
    if name not in made:
        if name == DEFAULT_SCHEDULER:
            made[name] = type(pipe.scheduler).from_config(pipe.scheduler.config)
        else:
            import diffusers

            made[name] = getattr(diffusers, SCHEDULERS[name]).from_config(pipe.scheduler.config)
    return copy.deepcopy(made[name])


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
