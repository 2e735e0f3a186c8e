"""A half-finished image as a value: taken at a step, turned to bytes and back, restored, it finishes with the
pixels of a run that never stopped; bytes that are torn, altered, of a newer format or of another request
are refused with the reason."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import torch

from embedded_worker.diffusion.conditioning import join_conditioning
from embedded_worker.diffusion.denoise import decode_pixels, encode_prompt, predict_noise, start_cohort
from embedded_worker.diffusion.denoise_state import FORMAT_VERSION, DenoiseState, StateRefused
from tests.loop_against_pipeline import image_spec, tiny_pipeline


@pytest.fixture(scope="module")
def sd_pipe(model_cache):
    return tiny_pipeline(model_cache, "builtin:tiny-sd")


@pytest.fixture(scope="module")
def flux_pipe(model_cache):
    return tiny_pipeline(model_cache, "builtin:tiny-flux")


def cohort_of(pipe, specs):
    conditioning = join_conditioning([encode_prompt(pipe, s) for s in specs])
    return start_cohort(pipe, [s.seed for s in specs], specs, conditioning)


@torch.inference_mode()
def run(pipe, specs, stop_at: int | None = None):
    """Pixels of `specs` run as one cohort; with `stop_at`, every image is taken as bytes at that step, and
    each is restored alone (all sharing each forward, as after a restart) to finish."""
    cohorts = [cohort_of(pipe, specs)]
    while not cohorts[0].finished:
        if cohorts[0].step_index == stop_at:
            stored = [state.to_bytes() for state in DenoiseState.capture(cohorts[0])]
            cohorts = [DenoiseState.from_bytes(data).restore(pipe, spec.seed, spec, encode_prompt(pipe, spec),
                                                             torch.device("cpu"))
                       for data, spec in zip(stored, specs)]
            stop_at = None
            continue
        predict_noise(pipe, cohorts, 10_000)
        if len(cohorts) > 1 and cohorts[0].finished:
            break
    return [image for cohort in cohorts for image in decode_pixels(pipe, cohort, 1)]  # each decoded alone


@pytest.mark.parametrize("scheduler", ["default", "dpmpp_2m", "unipc", "euler_a", "heun"])
def test_a_state_taken_mid_run_finishes_with_the_uninterrupted_pixels(sd_pipe, scheduler):
    specs = [image_spec(seed, steps=6, scheduler=scheduler, guidance_scale=3.0) for seed in (11, 12)]
    uninterrupted = run(sd_pipe, specs)
    resumed = run(sd_pipe, specs, stop_at=3)
    for a, b in zip(uninterrupted, resumed):
        np.testing.assert_array_equal(a, b)


def test_a_flow_matching_state_resumes_exactly_too(flux_pipe):
    specs = [image_spec(seed, steps=5, guidance_scale=3.5) for seed in (21, 22)]
    uninterrupted = run(flux_pipe, specs)
    for a, b in zip(uninterrupted, run(flux_pipe, specs, stop_at=2)):
        np.testing.assert_array_equal(a, b)


@torch.inference_mode()
def state_bytes(pipe, **fields) -> tuple[bytes, object]:
    spec = image_spec(5, steps=4, **fields)
    cohort = cohort_of(pipe, [spec])
    predict_noise(pipe, [cohort], 10_000)
    return DenoiseState.capture(cohort)[0].to_bytes(), spec


def test_torn_or_altered_bytes_are_refused(sd_pipe):
    data, _ = state_bytes(sd_pipe)
    with pytest.raises(StateRefused, match="torn|cannot be read"):
        DenoiseState.from_bytes(data[: len(data) - 7])
    altered = bytearray(data)
    altered[-3] ^= 0xFF  # a latent's byte
    with pytest.raises(StateRefused, match="checksum"):
        DenoiseState.from_bytes(bytes(altered))
    with pytest.raises(StateRefused, match="not a denoise state"):
        DenoiseState.from_bytes(b"\x00" * 3)


def test_a_newer_format_is_refused_with_the_versions(sd_pipe):
    data, _ = state_bytes(sd_pipe)
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    state = json.loads(header["__metadata__"]["state"])
    state["format_version"] = FORMAT_VERSION + 1
    header["__metadata__"]["state"] = json.dumps(state)
    raw = json.dumps(header).encode()
    newer = struct.pack("<Q", len(raw)) + raw + data[8 + length :]
    with pytest.raises(StateRefused, match=f"format version {FORMAT_VERSION + 1}.*up to {FORMAT_VERSION}"):
        DenoiseState.from_bytes(newer)


def test_a_state_resumes_only_the_request_it_was_taken_from(sd_pipe):
    data, spec = state_bytes(sd_pipe)
    other = image_spec(6, steps=4)
    state = DenoiseState.from_bytes(data)
    with pytest.raises(StateRefused, match="another request"):
        state.restore(sd_pipe, 6, other, encode_prompt(sd_pipe, other), torch.device("cpu"))
    assert state.restore(sd_pipe, 5, spec, encode_prompt(sd_pipe, spec), torch.device("cpu")).step_index == 1
