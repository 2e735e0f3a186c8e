"""Flux.1: `FluxPipeline.__call__` phase by phase.

A transformer over packed 2x2 latent patches, with position ids for the
image patches and the text tokens; flow matching (`FlowMatchEulerDiscrete`)
on sigmas shifted by `mu`, which grows with the image's token count. The
guidance-distilled variant (dev) takes the guidance scale as an embedding,
one value per row; the timestep-distilled one (schnell) takes none. Neither
doubles rows for classifier-free guidance, so a negative prompt has no
effect (the pipeline's optional `true_cfg_scale` is not offered). img2img
follows `FluxImg2ImgPipeline`.
"""

from __future__ import annotations

import weakref
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from ...errors import InvalidRequest
from ..conditioning import Conditioning
from ..modules import device_of, dtype_of
from ..schedulers import DEFAULT_SCHEDULER, make_scheduler
from .defaults import ModelDefaults
from .stable_diffusion import read_configs

DEFAULT_SAMPLE_SIZE = 128  # FluxPipeline's default_sample_size, in latent pixels
MAX_SEQUENCE_LENGTH = 512  # the pipeline's default and its limit for T5 tokens
# FluxPipeline's own defaults serve the guidance-distilled model (dev); the timestep-distilled one (schnell)
# was trained to draw in 4 steps, with no guidance and 256 T5 tokens (its model card's call)
DISTILLED_GUIDANCE = ModelDefaults(28, 3.5, 0, 0, MAX_SEQUENCE_LENGTH)
DISTILLED_TIMESTEPS = ModelDefaults(4, 0.0, 0, 0, 256)
# pipe -> {(height, width, text tokens, device, dtype): (text ids, image ids)}; the device thread's only
_POSITION_IDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class Flux:
    name = "flux"
    pipeline_classes = ("FluxPipeline",)

    def denoiser(self, pipe):
        return pipe.transformer

    def native_size(self, folder: Path) -> tuple[int, int]:
        """The pipeline's default size: 128 latent pixels times the VAE's scale."""
        [vae] = read_configs(folder, "vae")
        side = DEFAULT_SAMPLE_SIZE * 2 ** (len(vae.get("block_out_channels", [0, 0, 0, 0])) - 1)
        return side, side

    def defaults(self, folder: Path) -> ModelDefaults:
        [transformer] = read_configs(folder, "transformer")
        width, height = self.native_size(folder)
        own = DISTILLED_GUIDANCE if transformer.get("guidance_embeds", False) else DISTILLED_TIMESTEPS
        return replace(own, width=width, height=height)

    def classifier_free(self, spec) -> bool:
        return False

    def encode_prompt(self, pipe, spec) -> Conditioning:
        """CLIP's pooled embedding and T5's token embeddings, padded to the model's sequence length."""
        embeds, pooled, _ = pipe.encode_prompt(prompt=spec.prompt, device=pipe.transformer.device,
                                               num_images_per_prompt=1,
                                               max_sequence_length=max_sequence_length(pipe))
        return Conditioning({"encoder_hidden_states": embeds, "pooled_projections": pooled}, None)

    def start(self, pipe, specs: list, generators: list[torch.Generator], dtype) -> tuple:
        """(scheduler, timesteps, packed latents): noise, or for img2img the image's latents noised to the
        step its strength starts at, as `FluxImg2ImgPipeline` makes them."""
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps
        from diffusers.utils.torch_utils import randn_tensor

        spec = specs[0]
        if spec.scheduler != DEFAULT_SCHEDULER:
            raise InvalidRequest(f"{self.name} models run their own flow-matching scheduler, not '{spec.scheduler}'")
        device = device_of(pipe.transformer)
        height, width = latent_size(pipe, spec)
        channels = pipe.transformer.config.in_channels // 4
        scheduler = make_scheduler(pipe, DEFAULT_SCHEDULER)
        config = scheduler.config
        sigmas = None if config.get("use_flow_sigmas") else np.linspace(1.0, 1 / spec.steps, spec.steps)
        mu = calculate_shift((height // 2) * (width // 2), config.get("base_image_seq_len", 256),
                             config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                             config.get("max_shift", 1.15))
        timesteps, _ = retrieve_timesteps(scheduler, spec.steps, device, sigmas=sigmas, mu=mu)
        shape = (1, channels, height, width)
        if spec.init_image is None:
            scheduler.set_begin_index(0)
            noise = [randn_tensor(shape, generator=g, device=device, dtype=dtype) for g in generators]
            return scheduler, timesteps, pipe._pack_latents(torch.cat(noise), len(specs), channels, height, width)
        timesteps, noised = noised_init_images(pipe, scheduler, timesteps, specs, generators, dtype)
        return scheduler, timesteps, pipe._pack_latents(noised, len(specs), channels, height, width)

    def model_input(self, pipe, cohort) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        latents = cohort.latents
        timestep = cohort.timesteps[cohort.step_index].expand(latents.shape[0]).to(latents.dtype)
        rows = cohort.conditioning.rows()
        if pipe.transformer.config.guidance_embeds:  # guidance-distilled: the scale embedded, one value per row
            guidance = torch.full([latents.shape[0]], cohort.guidance_scale, device=latents.device,
                                  dtype=torch.float32)
            rows = {**rows, "guidance": guidance}
        return latents, timestep, rows

    def forward(self, pipe, sample, timestep, rows: dict[str, torch.Tensor], spec) -> torch.Tensor:
        text = rows["encoder_hidden_states"]
        text_ids, image_ids = position_ids(pipe, spec, text)
        return pipe.transformer(
            hidden_states=sample,
            timestep=timestep / 1000,
            guidance=rows.get("guidance"),
            pooled_projections=rows["pooled_projections"],
            encoder_hidden_states=text,
            txt_ids=text_ids,
            img_ids=image_ids,
            return_dict=False,
        )[0]

    def vae_latents(self, pipe, latents: torch.Tensor, spec) -> torch.Tensor:
        latents = pipe._unpack_latents(latents, spec.height, spec.width, pipe.vae_scale_factor)
        latents = latents / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
        return latents.to(dtype_of(pipe.vae))


def noised_init_images(pipe, scheduler, timesteps: torch.Tensor, specs, generators, dtype) \
        -> tuple[torch.Tensor, torch.Tensor]:
    """img2img on a flow-matching schedule, as Flux's, SD3's and Chroma's img2img pipelines start it: the
    schedule from where `strength` says, each init image's latents noised to there; (timesteps, latents)."""
    from diffusers.utils.torch_utils import randn_tensor

    spec = specs[0]
    start = int(max(spec.steps - min(spec.steps * spec.strength, spec.steps), 0)) * scheduler.order
    timesteps = timesteps[start:]
    scheduler.set_begin_index(start)
    noised = []
    for s, g in zip(specs, generators):
        clean = encode_image(pipe, s, g, dtype)  # draws from g before the noise does, as the pipeline
        noise = randn_tensor(clean.shape, generator=g, device=clean.device, dtype=dtype)
        noised.append(scheduler.scale_noise(clean, timesteps[:1], noise))
    return timesteps, torch.cat(noised)


def encode_image(pipe, spec, generator: torch.Generator, dtype) -> torch.Tensor:
    """One init image's latents, shifted and scaled as `FluxImg2ImgPipeline._encode_vae_image` does (and
    Chroma's and SD3's img2img pipelines, the same way)."""
    from diffusers.pipelines.flux.pipeline_flux_img2img import retrieve_latents
    from PIL import Image

    image = pipe.image_processor.preprocess(Image.fromarray(spec.init_image), height=spec.height, width=spec.width)
    image = image.to(device=pipe.vae.device, dtype=dtype)
    latents = retrieve_latents(pipe.vae.encode(image), generator=generator)
    return (latents - pipe.vae.config.shift_factor) * pipe.vae.config.scaling_factor


def position_ids(pipe, spec, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(text ids, image ids) as `FluxPipeline` makes them once before its loop. Kept per pipe and shape: made
    at every step, they cost about 45 us of the step's Python (the text encoder's dtype lookup walks its
    modules), as much as the rest of the step together on a tiny model. Chroma's are the same."""
    key = (spec.height, spec.width, text.shape[1], text.device, text.dtype)
    made = _POSITION_IDS.setdefault(pipe, {})
    if key not in made:
        text_dtype = pipe.text_encoder.dtype if getattr(pipe, "text_encoder", None) is not None \
            else pipe.transformer.dtype
        height, width = latent_size(pipe, spec)
        made[key] = (torch.zeros(text.shape[1], 3, device=text.device, dtype=text_dtype),
                     pipe._prepare_latent_image_ids(1, height // 2, width // 2, text.device, text.dtype))
    return made[key]


def latent_size(pipe, spec) -> tuple[int, int]:
    """(height, width) of the unpacked latents: a multiple of 2 for the 2x2 patches."""
    scale = pipe.vae_scale_factor * 2
    return 2 * (spec.height // scale), 2 * (spec.width // scale)


def max_sequence_length(pipe) -> int:
    """T5 tokens per prompt: the model's own (512 for dev, 256 for schnell), or fewer where its tokenizer
    says so."""
    own = DISTILLED_GUIDANCE if pipe.transformer.config.guidance_embeds else DISTILLED_TIMESTEPS
    return min(own.max_sequence_length, pipe.tokenizer_2.model_max_length)


FLUX = Flux()
