"""The untrained shapes pipeline: a Stable Diffusion 1.x layout sized for a CPU.

64 px images go through a VAE that downsamples by 4, so the UNet works on
16x16 latents, the size whose training cost was measured here (about 163 ms
per AdamW step at batch 32 on two idle cores). The UNet and the text
encoder have the built-in tiny-sd shapes; the tokenizer is the same
byte-level CLIP tokenizer, so any prompt encodes. The schedule is SD's own,
so every sampler the worker offers runs on it unchanged.
"""

from __future__ import annotations

from ..diffusion.tiny_model import byte_level_tokenizer, text_encoder_config

NATIVE_SIZE = 64
LATENT_SIZE = 16  # NATIVE_SIZE / 4: three VAE blocks, two downsamplings
SCHEDULE = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000}


def build_components(seed: int) -> dict:
    """Freshly initialised components, the same for the same seed."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    tokenizer, vocab = byte_level_tokenizer()
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(text_encoder_config(vocab))
    vae = AutoencoderKL(
        block_out_channels=(16, 32, 64),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=NATIVE_SIZE,
    )
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=LATENT_SIZE,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    return {"tokenizer": tokenizer, "text_encoder": text_encoder, "vae": vae, "unet": unet,
            "noise_schedule": DDPMScheduler(**SCHEDULE)}


def assemble(components: dict):
    """The components as a StableDiffusionPipeline sampled with PNDM, like the built-in tiny-sd."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    scheduler = PNDMScheduler(**SCHEDULE, skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1)
    return StableDiffusionPipeline(
        vae=components["vae"],
        text_encoder=components["text_encoder"],
        tokenizer=components["tokenizer"],
        unet=components["unet"],
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
