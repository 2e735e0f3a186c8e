"""What a denoising step does between two forwards does not grow with its steps: counted, not timed.

On the tiny transformers a forward takes a few milliseconds, so the loop's own Python at each step boundary
weighs as much as on a real model's forward it would not; what the pipeline does once before its loop, the
loop does once too.
"""

from __future__ import annotations

import pytest

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
