"""What a denoising step does between two forwards does not grow with its steps: counted, not timed.

On the tiny transformers a forward takes a few milliseconds, so the loop's own Python at each step boundary
weighs as much as on a real model's forward it would not; what the pipeline does once before its loop, the
loop does once too.
"""

from __future__ import annotations

import pytest
import torch

from embedded_worker.diffusion.conditioning import join_conditioning
from embedded_worker.diffusion.denoise import decode_pixels, encode_prompt, predict_noise, start_cohort

from .loop_against_pipeline import image_spec, ours, tiny_pipeline


@pytest.mark.parametrize("model_id", ["builtin:tiny-flux", "builtin:tiny-chroma"])
def test_flux_position_ids_are_made_once_per_shape_not_at_every_step(model_cache, model_id, monkeypatch):
    pipe = tiny_pipeline(model_cache, model_id)
    made = []
    real = pipe._prepare_latent_image_ids
    monkeypatch.setattr(pipe, "_prepare_latent_image_ids", lambda *args: made.append(args) or real(*args))
    ours(pipe, [[image_spec(1, steps=6), image_spec(2, steps=6)], [image_spec(3, steps=6, guidance_scale=2.0)]])
    assert len(made) == 1, made  # the pipeline's own call makes them once, before its loop
    ours(pipe, [[image_spec(4, steps=3, width=48)]])
    assert len(made) == 2, made  # another shape: its own


@pytest.mark.parametrize("model_id", ["builtin:tiny-sd", "builtin:tiny-flux", "builtin:tiny-sd3"])
def test_a_cohort_asks_no_module_property_that_walks_its_submodules(model_cache, model_id, monkeypatch):
    """diffusers' `device` and `dtype` look for hooks in every submodule (0.3-1 ms each); a cohort's start,
    steps and decode read the first parameter instead, and make their scheduler from the config once."""
    from diffusers import ModelMixin
    from diffusers.configuration_utils import ConfigMixin

    pipe = tiny_pipeline(model_cache, model_id)
    ours(pipe, [[image_spec(1, steps=2)]])  # the first cohort makes the scheduler from the config
    specs = [image_spec(2, steps=3), image_spec(3, steps=3)]
    conditioning = join_conditioning([encode_prompt(pipe, s) for s in specs])  # encoding may ask them: cached
    asked, configured = [], []
    for name in ("device", "dtype"):
        real = getattr(ModelMixin, name)
        monkeypatch.setattr(ModelMixin, name, property(lambda module, real=real, name=name:
                                                       asked.append(name) or real.fget(module)))
    real_from_config = ConfigMixin.from_config.__func__
    monkeypatch.setattr(ConfigMixin, "from_config", classmethod(
        lambda cls, *args, **kwargs: configured.append(cls.__name__) or real_from_config(cls, *args, **kwargs)))
    with torch.inference_mode():
        cohort = start_cohort(pipe, [2, 3], specs, conditioning)
        while not cohort.finished:
            predict_noise(pipe, [cohort], 8)
        decode_pixels(pipe, cohort, 8)
    assert asked == []
    assert configured == []
