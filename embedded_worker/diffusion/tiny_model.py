"""The built-in tiny models: real diffusers pipelines built offline from configs.

No weights can be downloaded where this runs, so the worker ships recipes
instead: a CLIP text encoder with a locally written byte-level vocabulary, a
UNet, a VAE and a scheduler, initialised from a fixed seed. Each is written
once to the model cache and then loaded back through the same
`from_pretrained(folder, local_files_only=True)` path a real model takes, so
tests and the demo exercise the real loading code. Two families: SD (about
1.7 M parameters, 32 px native) and SDXL (two text encoders and the
text-time conditioning), so both conditioning paths run here.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from pathlib import Path

from .offline import set_offline_environment

RECIPE_VERSION = "v1"
TINY_MODELS = {"builtin:tiny-sd": "sd", "builtin:tiny-sdxl": "sdxl"}

_build_lock = threading.Lock()  # one build per process; the rename below covers other processes


def byte_level_alphabet() -> list[str]:
    """CLIP's printable stand-in for each of the 256 byte values, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    stand_ins: dict[int, str] = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in stand_ins:
            stand_ins[b] = chr(256 + extra)
            extra += 1
    return [stand_ins[b] for b in range(256)]


def byte_level_tokenizer():
    """A CLIP tokenizer over single bytes: no merges to write, every text encodes."""
    from transformers import CLIPTokenizer

    alphabet = byte_level_alphabet()
    vocab = {symbol: i for i, symbol in enumerate(alphabet)}
    vocab.update({symbol + "</w>": 256 + i for i, symbol in enumerate(alphabet)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77), vocab


def text_encoder_config(vocab: dict, projection_dim: int | None = None):
    from transformers import CLIPTextConfig

    extra = {"projection_dim": projection_dim} if projection_dim else {}
    return CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"],
        **extra,
    )


def _vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(32, 64),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=32,
        sample_size=32,
    )


def _build_sd():
    import torch
    from diffusers import PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    tokenizer, vocab = byte_level_tokenizer()
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(text_encoder_config(vocab))
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    vae = _vae()
    scheduler = PNDMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        skip_prk_steps=True,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _build_sdxl():
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    tokenizer, vocab = byte_level_tokenizer()
    tokenizer_2, _ = byte_level_tokenizer()
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(text_encoder_config(vocab))
    text_encoder_2 = CLIPTextModelWithProjection(text_encoder_config(vocab, projection_dim=32))
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=80,  # 6 time ids x 8 + the 32-wide pooled text embedding
        cross_attention_dim=64,  # the two encoders' hidden states side by side
        norm_num_groups=32,
    )
    vae = _vae()
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
    )
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
    )


_BUILDERS = {"sd": _build_sd, "sdxl": _build_sdxl}


def ensure_tiny_model(model_id: str, cache_dir: Path) -> Path:
    """The folder of built-in model `model_id`, building it on first use."""
    family = TINY_MODELS[model_id]
    folder = Path(cache_dir) / f"tiny-{family}-{RECIPE_VERSION}"
    if (folder / "model_index.json").is_file():
        return folder
    with _build_lock:
        if (folder / "model_index.json").is_file():
            return folder
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
        set_offline_environment()
        try:
            _BUILDERS[family]().save_pretrained(staging, safe_serialization=True)
            try:
                os.rename(staging, folder)  # atomic: another process may have won the race
            except OSError:
                if not (folder / "model_index.json").is_file():
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return folder
