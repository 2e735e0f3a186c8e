"""The denoising loop we own, driving a pipeline's own components step by step.

Design notes
- Why own the loop: `pipe(...)` runs start to finish on one thread. We need
  to stop at any step boundary (pause, cancel, OOM retry), let the device do
  other work meanwhile, and let images from different requests share one UNet
  forward. So we drive the pipeline's text encoders, UNet, VAE and a
  scheduler instance ourselves, mirroring `StableDiffusionPipeline.__call__`
  (and the SDXL and img2img variants) operation for operation. Tests check
  the result against the pipeline's own call, pixel for pixel.
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
import functools
import inspect
from dataclasses import dataclass, field

import numpy as np
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


@dataclass(frozen=True, eq=False)
class ImageSpec:
    """Everything that decides one image's pixels."""

    model_id: str
    prompt: str
    negative_prompt: str = ""
    seed: int = 0
    steps: int = 20
    guidance_scale: float = 7.5
    width: int = 512
    height: int = 512
    scheduler: str = DEFAULT_SCHEDULER
    strength: float = 1.0
    init_image: np.ndarray | None = field(default=None, repr=False)  # uint8 HWC, for img2img

    @property
    def uses_guidance(self) -> bool:
        return self.guidance_scale > 1.0

    def forward_key(self) -> tuple:
        """What must match for two images to share one UNet forward."""
        return (self.model_id, self.height, self.width, self.uses_guidance)

    def schedule_key(self) -> tuple:
        """What must match for two images to share one scheduler (a cohort)."""
        strength = self.strength if self.init_image is not None else 1.0
        return (*self.forward_key(), self.steps, self.scheduler, self.guidance_scale, strength)


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


def _step_kwargs(scheduler, generators: list[torch.Generator]) -> dict:
    accepted = _step_parameters(type(scheduler))
    kwargs = {}
    if "eta" in accepted:
        kwargs["eta"] = 0.0
    if "generator" in accepted:
        kwargs["generator"] = generators
    return kwargs


class Conditioning:
    """Per-image text conditioning rows: the prompt side and the negative side."""

    def __init__(self, positive: dict[str, torch.Tensor], negative: dict[str, torch.Tensor] | None):
        self.positive = positive
        self.negative = negative
        self._rows: dict[str, torch.Tensor] | None = None

    def rows(self) -> dict[str, torch.Tensor]:
        """Rows in the pipeline's order: all negatives, then all prompts (joined once: every step uses them)."""
        if self.negative is None:
            return self.positive
        if self._rows is None:
            self._rows = {k: torch.cat([self.negative[k], self.positive[k]]) for k in self.positive}
        return self._rows

    def take(self, index: torch.Tensor) -> "Conditioning":
        pick = lambda side: {k: v.index_select(0, index) for k, v in side.items()}  # noqa: E731
        return Conditioning(pick(self.positive), None if self.negative is None else pick(self.negative))


def encode_prompt(pipe, family: str, spec: ImageSpec) -> Conditioning:
    """The pipeline's own encoding of one image's prompt pair, as one row per side.

    Each prompt is encoded alone, never batched with others: text encoders'
    projections round differently at other batch sizes, and alone the rows are
    exactly those of the image's solo run, whoever it shares a forward with.
    """
    device = pipe.unet.device
    negative_prompt = spec.negative_prompt or None  # empty means none: SDXL then uses zeros
    if family == "sd":
        positive, negative = pipe.encode_prompt(spec.prompt, device, 1, spec.uses_guidance, negative_prompt)
        positive_rows, negative_rows = {"encoder_hidden_states": positive}, {"encoder_hidden_states": negative}
    else:
        positive, negative, pooled, negative_pooled = pipe.encode_prompt(
            prompt=spec.prompt,
            device=device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=spec.uses_guidance,
            negative_prompt=negative_prompt,
        )
        time_ids = pipe._get_add_time_ids(
            (spec.height, spec.width),
            (0, 0),
            (spec.height, spec.width),
            dtype=positive.dtype,
            text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim,
        ).to(device)
        positive_rows = {"encoder_hidden_states": positive, "text_embeds": pooled, "time_ids": time_ids}
        negative_rows = {"encoder_hidden_states": negative, "text_embeds": negative_pooled, "time_ids": time_ids}
    return Conditioning(positive_rows, negative_rows if spec.uses_guidance else None)


def join_conditioning(parts: list[Conditioning]) -> Conditioning:
    join = lambda sides: {k: torch.cat([side[k] for side in sides]) for k in sides[0]}  # noqa: E731
    positive = join([p.positive for p in parts])
    negative = None if parts[0].negative is None else join([p.negative for p in parts])
    return Conditioning(positive, negative)


class Cohort:
    """Images sharing one timestep schedule, stepped together by their own scheduler."""

    def __init__(self, members: list, specs: list[ImageSpec], scheduler, timesteps, latents, conditioning, generators):
        self.members = members  # opaque to this module: the caller's per-image handles
        self.specs = specs
        self.scheduler = scheduler
        self.timesteps = timesteps
        self.latents = latents
        self.conditioning = conditioning
        self.generators = generators
        self.step_index = 0
        self.guidance_scale = specs[0].guidance_scale
        self.uses_guidance = specs[0].uses_guidance

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
        return self.size * (2 if self.uses_guidance else 1)

    def model_input(self) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        t = self.timesteps[self.step_index]
        x = torch.cat([self.latents] * 2) if self.uses_guidance else self.latents
        x = self.scheduler.scale_model_input(x, t)
        return x, t.expand(x.shape[0]), self.conditioning.rows()

    def advance(self, noise_pred: torch.Tensor) -> None:
        """Guidance and one scheduler step, exactly as the pipeline does them."""
        if self.uses_guidance:
            uncond, text = noise_pred.chunk(2)
            noise_pred = uncond + self.guidance_scale * (text - uncond)
        t = self.timesteps[self.step_index]
        kwargs = _step_kwargs(self.scheduler, self.generators)
        self.latents = self.scheduler.step(noise_pred, t, self.latents, **kwargs, return_dict=False)[0]
        self.step_index += 1

    def split_off(self, positions: list[int]) -> "Cohort":
        """Remove the members at `positions` into a cohort of their own, state and all."""
        keep = [i for i in range(self.size) if i not in set(positions)]
        device = self.latents.device
        taken_index = torch.tensor(positions, device=device)
        kept_index = torch.tensor(keep, device=device)
        taken_scheduler = copy.deepcopy(self.scheduler)
        _slice_scheduler_state(taken_scheduler, self.size, taken_index)
        _slice_scheduler_state(self.scheduler, self.size, kept_index)
        taken = Cohort(
            [self.members[i] for i in positions],
            [self.specs[i] for i in positions],
            taken_scheduler,
            self.timesteps,
            self.latents.index_select(0, taken_index),
            self.conditioning.take(taken_index),
            [self.generators[i] for i in positions],
        )
        taken.step_index = self.step_index
        self.members = [self.members[i] for i in keep]
        self.specs = [self.specs[i] for i in keep]
        self.latents = self.latents.index_select(0, kept_index)
        self.conditioning = self.conditioning.take(kept_index)
        self.generators = [self.generators[i] for i in keep]
        return taken


def _slice_scheduler_state(scheduler, batch: int, index: torch.Tensor) -> None:
    """Keep only rows `index` of a scheduler's per-image state.

    Per-image state is latent-shaped (4-D, batch first): PNDM's `ets` and
    `cur_sample`, DPM/UniPC `model_outputs` and `sample`,
    Heun's `prev_derivative`. Schedules (`timesteps`, `sigmas`) are 1-D and
    shared, so the 4-D rule cannot mistake one for the other.
    """

    def pick(value):
        if torch.is_tensor(value) and value.ndim == 4 and value.shape[0] == batch:
            return value.index_select(0, index.to(value.device))
        if isinstance(value, list):
            return [pick(v) for v in value]
        return value

    for name, value in list(vars(scheduler).items()):
        if torch.is_tensor(value) or isinstance(value, list):
            setattr(scheduler, name, pick(value))


def start_cohort(pipe, members: list, specs: list[ImageSpec], conditioning: Conditioning) -> Cohort:
    """Make the schedule and the initial latents: the pipeline's steps 4 to 6."""
    from diffusers.utils.torch_utils import randn_tensor

    device = pipe.unet.device
    spec = specs[0]
    dtype = conditioning.positive["encoder_hidden_states"].dtype
    scheduler = make_scheduler(pipe, spec.scheduler)
    scheduler.set_timesteps(spec.steps, device=device)
    timesteps = scheduler.timesteps
    generators = [torch.Generator("cpu").manual_seed(s.seed) for s in specs]
    scale = pipe.vae_scale_factor
    shape = (1, pipe.unet.config.in_channels, spec.height // scale, spec.width // scale)
    if spec.init_image is None:
        noise = [randn_tensor(shape, generator=g, device=device, dtype=dtype) for g in generators]
        latents = torch.cat(noise) * scheduler.init_noise_sigma
    else:
        init_timestep = min(int(spec.steps * spec.strength), spec.steps)
        start = max(spec.steps - init_timestep, 0) * scheduler.order
        timesteps = timesteps[start:]
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(start)
        latent_timestep = timesteps[:1]
        noised = []
        for s, g in zip(specs, generators):
            clean = _encode_image(pipe, s, g, dtype)  # draws from g before the noise does, as the pipeline
            noise = randn_tensor(clean.shape, generator=g, device=device, dtype=dtype)
            noised.append(scheduler.add_noise(clean, noise, latent_timestep))
        latents = torch.cat(noised)
    return Cohort(members, specs, scheduler, timesteps, latents, conditioning, generators)


def _encode_image(pipe, spec: ImageSpec, generator: torch.Generator, dtype) -> torch.Tensor:
    """img2img's initial latents for one image, as the img2img pipeline makes them."""
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img import retrieve_latents
    from PIL import Image

    image = pipe.image_processor.preprocess(Image.fromarray(spec.init_image), height=spec.height, width=spec.width)
    vae = pipe.vae
    upcast = vae.dtype == torch.float16 and vae.config.force_upcast
    if upcast:
        vae.to(torch.float32)
    image = image.to(device=vae.device, dtype=vae.dtype)
    latents = retrieve_latents(vae.encode(image), generator=generator)
    if upcast:
        vae.to(torch.float16)
    mean, std = _latent_stats(vae, latents)
    if mean is not None:
        latents = (latents - mean) * vae.config.scaling_factor / std
    else:
        latents = vae.config.scaling_factor * latents
    return latents.to(dtype)


def _latent_stats(vae, latents):
    config = vae.config
    if getattr(config, "latents_mean", None) is None or getattr(config, "latents_std", None) is None:
        return None, None
    view = lambda values: torch.tensor(values).view(1, -1, 1, 1).to(latents.device, latents.dtype)  # noqa: E731
    return view(config.latents_mean), view(config.latents_std)


def predict_noise(unet, cohorts: list[Cohort], max_rows: int) -> None:
    """One UNet forward (in chunks of at most `max_rows`) and a step for every cohort.

    The scheduler steps only after every chunk succeeded, so an out-of-memory
    error leaves all latents untouched and the step can simply be retried.
    """
    parts = [c.model_input() for c in cohorts]
    sample = torch.cat([p[0] for p in parts]) if len(parts) > 1 else parts[0][0]
    timestep = torch.cat([p[1] for p in parts]) if len(parts) > 1 else parts[0][1]
    keys = parts[0][2].keys()
    conditions = {k: torch.cat([p[2][k] for p in parts]) if len(parts) > 1 else parts[0][2][k] for k in keys}
    outputs = []
    for start in range(0, sample.shape[0], max_rows):
        rows = slice(start, start + max_rows)
        added = {k: v[rows] for k, v in conditions.items() if k != "encoder_hidden_states"}
        outputs.append(
            unet(
                sample[rows],
                timestep[rows],
                encoder_hidden_states=conditions["encoder_hidden_states"][rows],
                added_cond_kwargs=added or None,
                return_dict=False,
            )[0]
        )
    noise = torch.cat(outputs) if len(outputs) > 1 else outputs[0]
    offset = 0
    for cohort in cohorts:
        cohort.advance(noise[offset : offset + cohort.rows])
        offset += cohort.rows


def decode_pixels(pipe, latents: torch.Tensor, max_images: int) -> list[np.ndarray]:
    """VAE decode to uint8 HWC images, each written once into its own C-contiguous array."""
    vae = pipe.vae
    upcast = vae.dtype == torch.float16 and vae.config.force_upcast
    if upcast:
        vae.to(torch.float32)
    latents = latents.to(next(iter(vae.post_quant_conv.parameters())).dtype)
    mean, std = _latent_stats(vae, latents)
    scale = vae.config.scaling_factor
    latents = latents * std / scale + mean if mean is not None else latents / scale
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
