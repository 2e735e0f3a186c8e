"""Stable Diffusion 3 / 3.5: `StableDiffusion3Pipeline.__call__` phase by phase.

An MMDiT transformer on unpacked latents, two CLIP encoders (pooled and
token embeddings) beside T5 (or zeros where a folder ships without
`text_encoder_3`, as diffusers allows), classifier-free guidance doubling
the rows, and flow matching (`FlowMatchEulerDiscrete`, shifted by the
scheduler's `shift`, or by a resolution-dependent `mu` where it asks for
dynamic shifting). img2img follows `StableDiffusion3Img2ImgPipeline`. The
pipeline's skip-layer guidance is not offered.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ...errors import InvalidRequest
from ..conditioning import Conditioning
from ..modules import device_of
from ..schedulers import DEFAULT_SCHEDULER, make_scheduler
from .defaults import ModelDefaults
from .flux import noised_init_images
from .stable_diffusion import read_configs

MAX_SEQUENCE_LENGTH = 256  # the pipeline's default T5 tokens per prompt
STEPS, GUIDANCE_SCALE = 28, 7.0  # StableDiffusion3Pipeline's defaults


class StableDiffusion3:
    name = "sd3"
    pipeline_classes = ("StableDiffusion3Pipeline",)

    def denoiser(self, pipe):
        return pipe.transformer

    def native_size(self, folder: Path) -> tuple[int, int]:
        """The transformer's sample size times the VAE's scale, as the pipeline's default."""
        transformer, vae = read_configs(folder, "transformer", "vae")
        side = int(transformer.get("sample_size", 128)) * 2 ** (len(vae.get("block_out_channels", [0] * 4)) - 1)
        return side, side

    def defaults(self, folder: Path) -> ModelDefaults:
        width, height = self.native_size(folder)
        return ModelDefaults(STEPS, GUIDANCE_SCALE, width, height, MAX_SEQUENCE_LENGTH)

    def classifier_free(self, spec) -> bool:
        return spec.guidance_scale > 1.0

    def encode_prompt(self, pipe, spec) -> Conditioning:
        guided = self.classifier_free(spec)
        positive, negative, pooled, negative_pooled = pipe.encode_prompt(
            prompt=spec.prompt, prompt_2=None, prompt_3=None, device=pipe.transformer.device,
            num_images_per_prompt=1, do_classifier_free_guidance=guided,
            negative_prompt=spec.negative_prompt or None, max_sequence_length=max_sequence_length(pipe))
        positive_rows = {"encoder_hidden_states": positive, "pooled_projections": pooled}
        negative_rows = {"encoder_hidden_states": negative, "pooled_projections": negative_pooled}
        return Conditioning(positive_rows, negative_rows if guided else None)

    def start(self, pipe, specs: list, generators: list[torch.Generator], dtype) -> tuple:
        from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import (
            calculate_shift,
            retrieve_timesteps,
        )
        from diffusers.utils.torch_utils import randn_tensor

        spec = specs[0]
        if spec.scheduler != DEFAULT_SCHEDULER:
            raise InvalidRequest(f"SD3 models run their own flow-matching scheduler, not '{spec.scheduler}'")
        device = device_of(pipe.transformer)
        scale = pipe.vae_scale_factor
        shape = (1, pipe.transformer.config.in_channels, spec.height // scale, spec.width // scale)
        scheduler = make_scheduler(pipe, DEFAULT_SCHEDULER)
        config = scheduler.config
        shift = {}
        if config.get("use_dynamic_shifting", None):
            patch = pipe.transformer.config.patch_size
            tokens = (shape[2] // patch) * (shape[3] // patch)
            shift["mu"] = calculate_shift(tokens, config.get("base_image_seq_len", 256),
                                          config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                                          config.get("max_shift", 1.16))
        timesteps, _ = retrieve_timesteps(scheduler, spec.steps, device, **shift)
        if spec.init_image is None:
            noise = [randn_tensor(shape, generator=g, device=device, dtype=dtype) for g in generators]
            return scheduler, timesteps, torch.cat(noise)
        timesteps, noised = noised_init_images(pipe, scheduler, timesteps, specs, generators, dtype)
        return scheduler, timesteps, noised

    def model_input(self, pipe, cohort) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        x = torch.cat([cohort.latents] * 2) if cohort.classifier_free else cohort.latents
        return x, cohort.timesteps[cohort.step_index].expand(x.shape[0]), cohort.conditioning.rows()

    def forward(self, pipe, sample, timestep, rows: dict[str, torch.Tensor], spec) -> torch.Tensor:
        return pipe.transformer(hidden_states=sample, timestep=timestep,
                                encoder_hidden_states=rows["encoder_hidden_states"],
                                pooled_projections=rows["pooled_projections"], return_dict=False)[0]

    def vae_latents(self, pipe, latents: torch.Tensor, spec) -> torch.Tensor:
        return latents / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor


def max_sequence_length(pipe) -> int:
    """T5 tokens per prompt: the pipeline's 256, or fewer where the model's tokenizer says so."""
    tokenizer = pipe.tokenizer_3
    return MAX_SEQUENCE_LENGTH if tokenizer is None else min(MAX_SEQUENCE_LENGTH, tokenizer.model_max_length)
STABLE_DIFFUSION_3 = StableDiffusion3()
