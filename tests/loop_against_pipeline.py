"""What the pixel-identity tests of every family share: a tiny model's pipeline, image specs, and our loop
run on them (`ours`), to compare with the family's own pipeline call."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from embedded_worker.diffusion.conditioning import join_conditioning
from embedded_worker.diffusion.denoise import ImageSpec, decode_pixels, encode_prompt, predict_noise, start_cohort
from embedded_worker.diffusion.models import load_pipeline, read_family
from embedded_worker.diffusion.tiny_model import ensure_tiny_model


def tiny_pipeline(model_cache: Path, model_id: str):
    """A built-in tiny model's pipeline on the CPU, with its `family` noted on it."""
    folder = ensure_tiny_model(model_id, model_cache)
    pipe = load_pipeline(folder, torch.device("cpu"), torch.float32)
    pipe.family = read_family(folder)
    return pipe


def image_spec(seed: int, **fields) -> ImageSpec:
    values = {"model_id": "m", "prompt": "a red cat", "seed": seed, "width": 32, "height": 32, **fields}
    return ImageSpec(**values)


@torch.inference_mode()
def ours(pipe, cohorts: list[list[ImageSpec]], split_after: int | None = None) -> list[np.ndarray]:
    """Run each list of specs as a cohort, all sharing every forward; optionally split the first image off
    after some steps and finish it beside the rest (pause/resume's path). Images in the order given, each
    checked to be a picture: broken weights decode to one flat colour, and two of those compare equal."""
    running = []
    for specs in cohorts:
        conditioning = join_conditioning([encode_prompt(pipe, s) for s in specs])
        running.append(start_cohort(pipe, [s.seed for s in specs], specs, conditioning))
    while not all(c.finished for c in running):
        predict_noise(pipe, [c for c in running if not c.finished and c.size], 10_000)
        if split_after is not None and running[0].step_index == split_after:
            running.append(running[0].split_off([0]))
            split_after = None
    pixels = {}
    for cohort in running:
        if cohort.size:
            pixels.update(zip(cohort.members, decode_pixels(pipe, cohort, 64)))
    images = [pixels[s.seed] for specs in cohorts for s in specs]
    assert all(image.std() > 1 for image in images), "a flat image: broken weights would compare equal"
    return images
