"""The built-in tiny models: real diffusers pipelines built offline from configs.

No weights can be downloaded where this runs, so the worker ships recipes
instead: a CLIP text encoder with a locally written byte-level vocabulary, a
UNet or transformer, a VAE and a scheduler, initialised from a fixed seed.
Each is written once to the model cache and then loaded back through the
same `from_pretrained(folder, local_files_only=True)` path a real model
takes, so tests and the demo exercise the real loading code. Families: SD
(about 1.7 M parameters, 32 px native), SDXL (two text encoders and the
text-time conditioning), and Flux in both variants, guidance-distilled (dev)
and timestep-distilled (schnell), with a T5 encoder whose tokenizer is
written with the `tokenizers` library.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from pathlib import Path

from .offline import quiet_libraries

RECIPE_VERSION = "v1"
TINY_MODELS = {  # model id -> recipe
    "builtin:tiny-sd": "sd",
    "builtin:tiny-sdxl": "sdxl",
    "builtin:tiny-flux": "flux",
    "builtin:tiny-flux-schnell": "flux-schnell",
    "builtin:tiny-sd3": "sd3",
    "builtin:tiny-chroma": "chroma",
}

# Held while a model is built here or loaded (`models.load_pipeline`): diffusers and transformers switch
# torch's weight initialisers off process-wide while they load, so a model built on another thread meanwhile
# kept uninitialised weights (a tiny Flux VAE with NaN, built while the device thread loaded tiny-sd). Also
# one build per process; the rename below covers other processes.
CONSTRUCTION_LOCK = threading.RLock()


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


def character_t5_tokenizer():
    """A T5 tokenizer over single printable characters (a unigram model, as T5's own), built offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -1.0)]
    pieces += [(chr(c), -2.0) for c in range(ord("!"), ord("~") + 1)]
    tokenizer = Tokenizer(models.Unigram(pieces, unk_id=2))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    # 32 tokens a prompt: the pipelines pad every prompt to the tokenizer's length (Flux's 512 at most)
    return T5TokenizerFast(tokenizer_object=tokenizer, eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                           extra_ids=0, model_max_length=32)


def _t5_encoder(vocab_size: int, width: int = 32):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=vocab_size, d_model=width, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                   relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1,
                                   decoder_start_token_id=0))


def _vae(**family):
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
        **family,
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


def _build_flux(guidance_distilled: bool):
    """Flux.1 dev (guidance embedded, resolution-shifted sigmas) or schnell (neither), at toy size."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    tokenizer, vocab = byte_level_tokenizer()
    tokenizer_2 = character_t5_tokenizer()
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(text_encoder_config(vocab))
    text_encoder_2 = _t5_encoder(len(tokenizer_2))
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,  # 4 latent channels in 2x2 patches
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        guidance_embeds=guidance_distilled,
        axes_dims_rope=[4, 4, 8],
    )
    vae = _vae(use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035)
    if guidance_distilled:
        scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_image_seq_len=256,
                                                    max_image_seq_len=4096, base_shift=0.5, max_shift=1.15)
    else:
        scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False)
    return FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=transformer)


def _build_sd3():
    """SD3: two projected CLIP encoders and T5 (64 wide: both CLIPs' states side by side fit), an MMDiT."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    tokenizer, vocab = byte_level_tokenizer()
    tokenizer_2, _ = byte_level_tokenizer()
    tokenizer_3 = character_t5_tokenizer()
    torch.manual_seed(0)
    text_encoder = CLIPTextModelWithProjection(text_encoder_config(vocab, projection_dim=32))
    text_encoder_2 = CLIPTextModelWithProjection(text_encoder_config(vocab, projection_dim=32))
    text_encoder_3 = _t5_encoder(len(tokenizer_3), width=64)
    transformer = SD3Transformer2DModel(
        sample_size=16,
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        caption_projection_dim=32,
        joint_attention_dim=64,
        pooled_projection_dim=64,  # the two CLIP projections side by side
    )
    vae = _vae(use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    return StableDiffusion3Pipeline(transformer=transformer, scheduler=scheduler, vae=vae,
                                    text_encoder=text_encoder, tokenizer=tokenizer,
                                    text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
                                    text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3)


def _build_chroma():
    """Chroma: Flux's shape conditioned on T5 alone, with an approximator in place of the pooled CLIP."""
    import torch
    from diffusers import ChromaPipeline, ChromaTransformer2DModel, FlowMatchEulerDiscreteScheduler

    tokenizer = character_t5_tokenizer()
    torch.manual_seed(0)
    text_encoder = _t5_encoder(len(tokenizer))
    transformer = ChromaTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        axes_dims_rope=[4, 4, 8],
        approximator_num_channels=16,
        approximator_hidden_dim=32,
        approximator_layers=1,
    )
    vae = _vae(use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_image_seq_len=256,
                                                max_image_seq_len=4096, base_shift=0.5, max_shift=1.15)
    return ChromaPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                          transformer=transformer)


RECIPES = {  # recipe -> (family, builder)
    "sd": ("sd", _build_sd),
    "sdxl": ("sdxl", _build_sdxl),
    "flux": ("flux", lambda: _build_flux(guidance_distilled=True)),
    "flux-schnell": ("flux", lambda: _build_flux(guidance_distilled=False)),
    "sd3": ("sd3", _build_sd3),
    "chroma": ("chroma", _build_chroma),
}


def tiny_family(model_id: str) -> str:
    """The family of built-in model `model_id`, known without building it."""
    return RECIPES[TINY_MODELS[model_id]][0]


def tiny_model_folder(model_id: str, cache_dir: Path) -> Path:
    """Where built-in model `model_id` is (or will be) built."""
    return Path(cache_dir) / f"tiny-{TINY_MODELS[model_id]}-{RECIPE_VERSION}"


def ensure_tiny_model(model_id: str, cache_dir: Path) -> Path:
    """The folder of built-in model `model_id`, building it on first use."""
    recipe = TINY_MODELS[model_id]
    folder = tiny_model_folder(model_id, cache_dir)
    if (folder / "model_index.json").is_file():
        return folder
    with CONSTRUCTION_LOCK:
        if (folder / "model_index.json").is_file():
            return folder
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
        quiet_libraries()
        try:
            RECIPES[recipe][1]().save_pretrained(staging, safe_serialization=True)
            try:
                os.rename(staging, folder)  # atomic: another process may have won the race
            except OSError:
                if not (folder / "model_index.json").is_file():
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return folder
