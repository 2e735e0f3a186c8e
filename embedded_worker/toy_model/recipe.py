"""The untrained shapes pipeline: a Stable Diffusion 1.x layout sized for a CPU.

64 px images go through a VAE that downsamples by 4, so the UNet works on
16x16 latents, the size whose training cost was measured here (about 163 ms
per AdamW step at batch 32 on two idle cores). The UNet and the text
encoder have the built-in tiny-sd shapes. The tokenizer is tiny-sd's
byte-level CLIP tokenizer plus BPE merges that make each word of the
captions one token: "red" then sits at the same position in every caption,
which a tiny cross-attention learns far sooner than three letters whose
position moves with the words before them. Any other text still encodes,
byte by byte. The schedule is SD's own, so every sampler the worker offers
runs on it unchanged.
"""

from __future__ import annotations

from ..diffusion.tiny_model import byte_level_alphabet, text_encoder_config
from .dataset import COLOURS, SHAPES

NATIVE_SIZE = 64
LATENT_SIZE = 16  # NATIVE_SIZE / 4: three VAE blocks, two downsamplings
SCHEDULE = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000}


WORDS = ("a", "on", "background", *COLOURS, *SHAPES)


def word_tokenizer():
    """CLIP's tokenizer over bytes, with merges that build each of WORDS from its prefixes.

    BPE applies the lowest-ranked merge first, so each word's merges are
    ranked together, longest word first: "gr" (green) then outranks "re"
    (red), and "green" still ends up one token.
    """
    from transformers import CLIPTokenizer

    alphabet = byte_level_alphabet()
    vocab = {symbol: i for i, symbol in enumerate(alphabet)}
    vocab.update({symbol + "</w>": 256 + i for i, symbol in enumerate(alphabet)})
    merges: list[tuple[str, str]] = []
    for word in sorted(WORDS, key=len, reverse=True):
        for length in range(2, len(word) + 1):
            pair = (word[: length - 1], word[length - 1] + ("</w>" if length == len(word) else ""))
            if pair not in merges:
                merges.append(pair)
                vocab.setdefault("".join(pair), len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77), vocab


def build_components(seed: int) -> dict:
    """Freshly initialised components, the same for the same seed."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    tokenizer, vocab = word_tokenizer()
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
