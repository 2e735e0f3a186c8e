"""Transformer families through our loop against diffusers' own pipelines, pixel for pixel.

Flux dev (guidance embedded, resolution-shifted sigmas), Flux schnell (no
guidance, no shift), SD3 (three text encoders, classifier-free guidance) and
Chroma (Flux's shape on T5 alone, with a negative prompt), each on a tiny
random model built from configs.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from embedded_worker.diffusion.denoise import ImageSpec
from embedded_worker.diffusion.families import chroma, flux, stable_diffusion_3

from .conftest import assert_same_up_to_batch_rounding
from .loop_against_pipeline import image_spec, ours, tiny_pipeline

SEQUENCE_LENGTH = {"flux": flux.max_sequence_length, "sd3": stable_diffusion_3.max_sequence_length,
                   "chroma": chroma.max_sequence_length}
MODELS = ["builtin:tiny-flux", "builtin:tiny-flux-schnell", "builtin:tiny-sd3", "builtin:tiny-chroma"]


@pytest.fixture(scope="module", params=MODELS)
def pipe(request, model_cache):
    return tiny_pipeline(model_cache, request.param)


def spec(seed: int, **fields) -> ImageSpec:
    return image_spec(seed, **{"steps": 3, "guidance_scale": 3.5, **fields})


def theirs(pipe, specs: list[ImageSpec]) -> list[np.ndarray]:
    generators = [torch.Generator().manual_seed(s.seed) for s in specs]
    negative = {"negative_prompt": [s.negative_prompt for s in specs]} if specs[0].negative_prompt else {}
    images = pipe(
        prompt=[s.prompt for s in specs],
        **negative,
        generator=generators if len(specs) > 1 else generators[0],
        num_inference_steps=specs[0].steps,
        guidance_scale=specs[0].guidance_scale,
        height=specs[0].height,
        width=specs[0].width,
        max_sequence_length=SEQUENCE_LENGTH[pipe.family](pipe),
        output_type="np",
    ).images
    return [(image * 255).round().astype(np.uint8) for image in images]


def test_single_image_is_bit_identical_to_the_pipeline_call(pipe):
    [a], [b] = ours(pipe, [[spec(11)]]), theirs(pipe, [spec(11)])
    assert a.shape == (32, 32, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)


def test_negative_prompt_and_no_guidance_match_the_pipeline(pipe):
    """SD3 and Chroma guide with a negative prompt; Flux ignores both, as its pipeline does without
    true_cfg_scale."""
    for fields in ({"negative_prompt": "blurry, dark"}, {"guidance_scale": 1.0}):
        [a], [b] = ours(pipe, [[spec(5, **fields)]]), theirs(pipe, [spec(5, **fields)])
        assert np.array_equal(a, b), fields


def test_a_non_square_image_matches_the_pipeline(pipe):
    """Flux's packing, image ids and unpacking before decode follow height and width separately."""
    [a], [b] = ours(pipe, [[spec(4, width=48, height=32)]]), theirs(pipe, [spec(4, width=48, height=32)])
    assert a.shape == (32, 48, 3)
    assert np.array_equal(a, b)


def test_a_coalesced_cohort_of_three_matches_the_batched_pipeline_call(pipe):
    """Bit for bit on Flux. SD3's CLIP text projections round differently at batch 3 than alone, and we
    encode each prompt alone (`encode_prompt`, as for SDXL); Chroma's pipeline runs the negative rows as a
    second forward, we run them beside the prompt rows: there, batched-kernel rounding only."""
    specs = [spec(i, prompt=p) for i, p in enumerate(["a red cat", "a blue house", "a red cat"])]
    for a, b in zip(ours(pipe, [specs]), theirs(pipe, specs)):
        if pipe.family == "flux":
            assert np.array_equal(a, b)
        else:
            assert_same_up_to_batch_rounding(a, b)


def test_cohorts_of_other_guidance_share_a_forward_and_each_matches_its_own_pipeline_call(pipe):
    """Two sessions with different guidance scales (and step counts) coalesce into one forward."""
    first, second = [spec(1), spec(2)], [spec(3, guidance_scale=5.0, prompt="a blue house", steps=4)]
    together = ours(pipe, [first, second])
    for a, b in zip(together, theirs(pipe, first) + theirs(pipe, second)):
        assert_same_up_to_batch_rounding(a, b)
    assert np.abs(together[0].astype(int) - together[2].astype(int)).mean() > 5  # they really differ


def test_an_image_split_off_mid_run_finishes_as_its_solo_run(pipe):
    """What pause, cancel and preemption do to a cohort: the image leaves with its state and resumes."""
    specs = [spec(21), spec(22), spec(23)]
    split = ours(pipe, [specs], split_after=1)
    together = ours(pipe, [specs])
    [solo] = ours(pipe, [[specs[0]]])
    assert_same_up_to_batch_rounding(split[0], solo)
    for a, b in zip(split[1:], together[1:]):
        assert_same_up_to_batch_rounding(a, b)


@pytest.mark.parametrize("strength", [0.3, 0.6])
def test_img2img_matches_the_familys_img2img_pipeline(pipe, strength):
    """FluxImg2ImgPipeline, StableDiffusion3Img2ImgPipeline, ChromaImg2ImgPipeline: bit for bit alone; a
    cohort of two bit for bit on Flux and within batch rounding on SD3 and Chroma (see the cohort test)."""
    from diffusers import ChromaImg2ImgPipeline, FluxImg2ImgPipeline, StableDiffusion3Img2ImgPipeline
    from PIL import Image

    img2img = {"flux": FluxImg2ImgPipeline, "sd3": StableDiffusion3Img2ImgPipeline,
               "chroma": ChromaImg2ImgPipeline}[pipe.family].from_pipe(pipe)
    init = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)

    def pipeline(specs: list[ImageSpec]) -> list[np.ndarray]:
        generators = [torch.Generator().manual_seed(s.seed) for s in specs]
        images = img2img(prompt=[s.prompt for s in specs], image=[Image.fromarray(init)] * len(specs),
                         strength=strength, generator=generators if len(specs) > 1 else generators[0],
                         num_inference_steps=4, guidance_scale=3.5, height=32, width=32, output_type="np",
                         max_sequence_length=SEQUENCE_LENGTH[pipe.family](pipe)).images
        return [(image * 255).round().astype(np.uint8) for image in images]

    specs = [spec(9, init_image=init, strength=strength, steps=4), spec(10, init_image=init, strength=strength,
                                                                        steps=4)]
    [alone] = ours(pipe, [specs[:1]])
    assert np.array_equal(alone, pipeline(specs[:1])[0])
    together = ours(pipe, [specs])
    for a, b in zip(together, pipeline(specs)):
        if pipe.family == "flux":
            assert np.array_equal(a, b)
        else:
            assert_same_up_to_batch_rounding(a, b)
    assert not np.array_equal(together[0], together[1])  # each image its own noise
