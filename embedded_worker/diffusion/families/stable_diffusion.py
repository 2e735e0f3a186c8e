"""Stable Diffusion 1.x/2.x: `StableDiffusionPipeline.__call__` (and its img2img variant) phase by phase.

A UNet predicts noise (or v) at integer timesteps; classifier-free
guidance doubles the rows; any of our named schedulers applies. SDXL is
this family with another prompt encoding (`stable_diffusion_xl`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ...errors import InvalidRequest
from ..conditioning import Conditioning
from ..modules import device_of
from ..schedulers import make_scheduler
from .defaults import ModelDefaults

STEPS = 20  # ours, not the pipeline's 50: enough for these models, and a CPU draws it in reasonable time
GUIDANCE_SCALE = 7.5


class StableDiffusion:
    name = "sd"
    pipeline_classes = ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline")

    def denoiser(self, pipe):
        return pipe.unet

    def native_size(self, folder: Path) -> tuple[int, int]:
        """(width, height) the model was trained at, read from its configs without loading weights."""
        unet, vae = read_configs(folder, "unet", "vae")
        sample = unet.get("sample_size", 64)
        sample = sample[0] if isinstance(sample, (list, tuple)) else sample
        side = int(sample) * 2 ** (len(vae.get("block_out_channels", [0, 0, 0, 0])) - 1)
        return side, side

    def defaults(self, folder: Path) -> ModelDefaults:
        width, height = self.native_size(folder)
        return ModelDefaults(STEPS, GUIDANCE_SCALE, width, height, None)

    def classifier_free(self, spec) -> bool:
        return spec.guidance_scale > 1.0

    def encode_prompt(self, pipe, spec) -> Conditioning:
        """The pipeline's own encoding of one image's prompt pair, one row per side."""
        guided = self.classifier_free(spec)
        positive, negative = pipe.encode_prompt(spec.prompt, pipe.unet.device, 1, guided, spec.negative_prompt or None)
        return Conditioning({"encoder_hidden_states": positive},
                            {"encoder_hidden_states": negative} if guided else None)

    def start(self, pipe, specs: list, generators: list[torch.Generator], dtype) -> tuple:
        """(scheduler, timesteps, latents): the pipeline's steps 4 to 6, each image from its own generator."""
        from diffusers.utils.torch_utils import randn_tensor

        device = device_of(pipe.unet)
        spec = specs[0]
        scheduler = make_scheduler(pipe, spec.scheduler)
        scheduler.set_timesteps(spec.steps, device=device)
        timesteps = scheduler.timesteps
        scale = pipe.vae_scale_factor
        shape = (1, pipe.unet.config.in_channels, spec.height // scale, spec.width // scale)
        if spec.init_image is None:
            noise = [randn_tensor(shape, generator=g, device=device, dtype=dtype) for g in generators]
            return scheduler, timesteps, torch.cat(noise) * scheduler.init_noise_sigma
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
        return scheduler, timesteps, torch.cat(noised)

    def model_input(self, pipe, cohort) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        t = cohort.timesteps[cohort.step_index]
        x = torch.cat([cohort.latents] * 2) if cohort.classifier_free else cohort.latents
        x = cohort.scheduler.scale_model_input(x, t)
        return x, t.expand(x.shape[0]), cohort.conditioning.rows()

    def forward(self, pipe, sample, timestep, rows: dict[str, torch.Tensor], spec) -> torch.Tensor:
        added = {k: v for k, v in rows.items() if k != "encoder_hidden_states"}
        return pipe.unet(sample, timestep, encoder_hidden_states=rows["encoder_hidden_states"],
                         added_cond_kwargs=added or None, return_dict=False)[0]

    def vae_latents(self, pipe, latents: torch.Tensor, spec) -> torch.Tensor:
        vae = pipe.vae
        latents = latents.to(next(iter(vae.post_quant_conv.parameters())).dtype)
        mean, std = _latent_stats(vae, latents)
        scale = vae.config.scaling_factor
        return latents * std / scale + mean if mean is not None else latents / scale


def read_configs(folder: Path, *components: str) -> list[dict]:
    """Component configs of a model folder, read without loading weights."""
    try:
        return [json.loads((folder / name / "config.json").read_text(encoding="utf-8")) for name in components]
    except (OSError, ValueError) as error:
        raise InvalidRequest(f"model folder {folder} is incomplete: {error}") from None


def _encode_image(pipe, spec, generator: torch.Generator, dtype) -> torch.Tensor:
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


STABLE_DIFFUSION = StableDiffusion()
