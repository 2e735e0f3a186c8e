"""The denoising loop we own, driving a pipeline's own components step by step.

Design notes
- Why own the loop: `pipe(...)` runs start to finish on one thread. We need
  to stop at any step boundary (pause, cancel, OOM retry), let the device do
  other work meanwhile, and let images from different requests share one
  denoiser forward. So we drive the pipeline's text encoders, denoiser (UNet or
  transformer), VAE and a scheduler instance ourselves, mirroring the
  pipeline's `__call__` operation for operation. What differs between model
  families (SD, SDXL, Flux) is a family adapter (`families`); this module is
  the loop around it and knows no family. Tests check the result against
  the pipeline's own call, pixel for pixel.
- A `Cohort` is a set of images that share one timestep schedule: same step
  count, scheduler, guidance and strength. It owns a scheduler instance, so
  its state (PNDM's history, DPM's model outputs) belongs to it alone. A
  member that pauses or is cancelled is split off with its slice of that
  state, and can resume later, alone or beside other work.
- Several cohorts of the same model, size and guidance mode share a forward:
  rows are concatenated, each with its own timestep, then split back.
- Per image, a CPU generator seeded from the image's seed makes the initial
  noise (and any scheduler noise), so an image is reproducible alone and the
  same on every device.
- Batched kernels round differently from single-image ones (seen here: about
  1e-6 in float, at most 1 of 255 on a few pixels in 100,000). An image that
  ran beside others therefore equals its solo run to that tolerance; with
  the same companions (or alone) it is bit-identical.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch

from .families import adapter_for
from .image_spec import ImageSpec
from .modules import dtype_of
from .schedulers import step_kwargs

if TYPE_CHECKING:
    from .conditioning import Conditioning

# (a step's chunks, the row cap) -> the compiled forward for all of them, or None: run eager
CompiledChoice = Callable[[list, int], "Callable | None"]


def encode_prompt(pipe, spec: ImageSpec) -> Conditioning:
    """The pipeline's own encoding of one image's prompt pair, as one row per side.

    Each prompt is encoded alone, never batched with others: text encoders'
    projections round differently at other batch sizes, and alone the rows are
    exactly those of the image's solo run, whoever it shares a forward with.
    """
    return adapter_for(pipe).encode_prompt(pipe, spec)


class Cohort:
    """Images sharing one timestep schedule, stepped together by their own scheduler."""

    def __init__(self, adapter, members: list, specs: list[ImageSpec], scheduler, timesteps, latents,
                 conditioning: Conditioning, generators):
        self.adapter = adapter  # the model family's phases (`families`)
        self.members = members  # opaque to this module: the caller's per-image handles
        self.specs = specs
        self.scheduler = scheduler
        self.timesteps = timesteps
        self.latents = latents
        self.conditioning = conditioning
        self.generators = generators
        self.step_index = 0
        self.checkpointed_at = 0  # the step its state was last taken at (`checkpoint_cadence`)
        self.promised_every: int | None = None  # the interval that state carries: the next comes within it
        self.guidance_scale = specs[0].guidance_scale
        self.classifier_free = adapter.classifier_free(specs[0])  # two rows per image: negative and prompt

    @property
    def size(self) -> int:
        return len(self.members)

    @property
    def total_steps(self) -> int:
        return len(self.timesteps)

    @property
    def finished(self) -> bool:
        return self.step_index >= len(self.timesteps)

    @property
    def rows(self) -> int:
        return self.size * (2 if self.classifier_free else 1)

    def advance(self, noise_pred: torch.Tensor) -> None:
        """Guidance and one scheduler step, exactly as the pipeline does them."""
        if self.classifier_free:
            uncond, text = noise_pred.chunk(2)
            noise_pred = uncond + self.guidance_scale * (text - uncond)
        t = self.timesteps[self.step_index]
        kwargs = step_kwargs(self.scheduler, self.generators)
        self.latents = self.scheduler.step(noise_pred, t, self.latents, **kwargs, return_dict=False)[0]
        self.step_index += 1

    def split_off(self, positions: list[int]) -> "Cohort":
        """Remove the members at `positions` into a cohort of their own, state and all."""
        keep = [i for i in range(self.size) if i not in set(positions)]
        device = self.latents.device
        taken_index = torch.tensor(positions, device=device)
        kept_index = torch.tensor(keep, device=device)
        taken_scheduler = copy.deepcopy(self.scheduler)
        _slice_scheduler_state(taken_scheduler, self.size, self.latents.ndim, taken_index)
        _slice_scheduler_state(self.scheduler, self.size, self.latents.ndim, kept_index)
        taken = Cohort(
            self.adapter,
            [self.members[i] for i in positions],
            [self.specs[i] for i in positions],
            taken_scheduler,
            self.timesteps,
            self.latents.index_select(0, taken_index),
            self.conditioning.take(taken_index),
            [self.generators[i] for i in positions],
        )
        taken.step_index = taken.checkpointed_at = self.step_index
        taken.promised_every = self.promised_every
        self.members = [self.members[i] for i in keep]
        self.specs = [self.specs[i] for i in keep]
        self.latents = self.latents.index_select(0, kept_index)
        self.conditioning = self.conditioning.take(kept_index)
        self.generators = [self.generators[i] for i in keep]
        return taken


def _slice_scheduler_state(scheduler, batch: int, rank: int, index: torch.Tensor) -> None:
    """Keep only rows `index` of a scheduler's per-image state.

    Per-image state is latent-shaped (the latents' rank, batch first): PNDM's
    `ets` and `cur_sample`, DPM/UniPC `model_outputs` and `sample`, Heun's
    `prev_derivative`. Schedules (`timesteps`, `sigmas`) are 1-D and shared,
    and latents are 3-D (packed, Flux) or 4-D, so the rank rule cannot
    mistake one for the other.
    """

    def pick(value):
        if torch.is_tensor(value) and value.ndim == rank and value.shape[0] == batch:
            return value.index_select(0, index.to(value.device))
        if isinstance(value, list):
            return [pick(v) for v in value]
        return value

    for name, value in list(vars(scheduler).items()):
        if torch.is_tensor(value) or isinstance(value, list):
            setattr(scheduler, name, pick(value))


def start_cohort(pipe, members: list, specs: list[ImageSpec], conditioning: Conditioning) -> Cohort:
    """Make the schedule and the initial latents (the family's own steps), one generator per image."""
    adapter = adapter_for(pipe)
    dtype = conditioning.positive["encoder_hidden_states"].dtype
    generators = [torch.Generator("cpu").manual_seed(s.seed) for s in specs]
    scheduler, timesteps, latents = adapter.start(pipe, specs, generators, dtype)
    return Cohort(adapter, members, specs, scheduler, timesteps, latents, conditioning, generators)


def predict_noise(pipe, cohorts: list[Cohort], max_rows: int, compiled: CompiledChoice | None = None) -> None:
    """One denoiser forward (in chunks of at most `max_rows`) and a step for every cohort.

    The cohorts share a forward key (model, size, guidance mode), so one
    adapter and the first image's spec speak for all of them. The scheduler
    steps only after every chunk succeeded, so an out-of-memory error leaves
    all latents untouched and the step can simply be retried. `compiled`
    picks the step's compiled forward (`compiled_denoiser`) once, for all its
    chunks; None from it, or no `compiled`, runs the family's eager forward.
    """
    adapter, spec = cohorts[0].adapter, cohorts[0].specs[0]
    parts = [adapter.model_input(pipe, c) for c in cohorts]
    sample = torch.cat([p[0] for p in parts]) if len(parts) > 1 else parts[0][0]
    timestep = torch.cat([p[1] for p in parts]) if len(parts) > 1 else parts[0][1]
    keys = parts[0][2].keys()
    conditions = {k: torch.cat([p[2][k] for p in parts]) if len(parts) > 1 else parts[0][2][k] for k in keys}
    chunks = [(sample[rows], timestep[rows], {k: v[rows] for k, v in conditions.items()})
              for rows in (slice(start, start + max_rows) for start in range(0, sample.shape[0], max_rows))]
    run = compiled(chunks, max_rows) if compiled is not None else None
    if run is None:
        outputs = [adapter.forward(pipe, x, t, rows, spec) for x, t, rows in chunks]
    else:
        outputs = [run(x, t, rows) for x, t, rows in chunks]
    noise = torch.cat(outputs) if len(outputs) > 1 else outputs[0]
    offset = 0
    for cohort in cohorts:
        cohort.advance(noise[offset : offset + cohort.rows])
        offset += cohort.rows


def decode_pixels(pipe, cohort: Cohort, max_images: int) -> list[np.ndarray]:
    """VAE decode to uint8 HWC images, each written once into its own C-contiguous array."""
    vae = pipe.vae
    upcast = dtype_of(vae) == torch.float16 and vae.config.force_upcast
    if upcast:
        vae.to(torch.float32)
    latents = cohort.adapter.vae_latents(pipe, cohort.latents, cohort.specs[0])
    images: list[np.ndarray] = []
    for start in range(0, latents.shape[0], max_images):
        decoded = vae.decode(latents[start : start + max_images], return_dict=False)[0]
        scaled = (decoded * 0.5 + 0.5).clamp(0, 1).float().mul_(255).round_()
        if scaled.device.type != "cpu":
            scaled = scaled.to(torch.uint8)  # cast on the device: a quarter of the bytes cross the bus
        for image in scaled.permute(0, 2, 3, 1):
            pixels = np.empty(tuple(image.shape), dtype=np.uint8)
            torch.from_numpy(pixels).copy_(image)  # the one copy: into memory the caller keeps
            pixels.setflags(write=False)
            images.append(pixels)
    if upcast:
        vae.to(torch.float16)
    return images
