"""A half-finished image as a value: taken at a step, turned to bytes and back, restored, it finishes with the
pixels of a run that never stopped; bytes that are torn, altered, of a newer format or of another request
are refused with the reason."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import torch

from embedded_worker.config import CheckpointConfig
from embedded_worker.diffusion.checkpoint_cadence import CheckpointCadence
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


class _Image:
    """A record's image as the cadence sees it: named, so it is checkpointed."""

    def __init__(self, name: str):
        self.record_id, self.checkpoint_key = "record", name


class _Sink:
    """Where taken states go (the checkpoint writer's place), with the write cost the cadence reads."""

    def __init__(self):
        self.seconds_per_image = None
        self.taken: list[tuple[int, int]] = []  # (step, interval) of each state handed over

    def save(self, record_id, image, state) -> None:
        self.taken.append((state.step_index, state.interval))


@torch.inference_mode()
def test_each_checkpoint_comes_within_the_interval_the_last_one_carries(sd_pipe):
    """The first checkpoint is taken before its cost is known (interval 1) and the budget then allows one every
    many steps: the next still comes one step later, so each state's interval bounds the steps a process that
    died after writing it had gone past it."""
    specs = [image_spec(prompt="a lighthouse", seed=3, steps=10)]
    cohort = start_cohort(sd_pipe, [_Image("0.0")], specs, join_conditioning([encode_prompt(sd_pipe, specs[0])]))
    sink = _Sink()
    cadence = CheckpointCadence(sink, CheckpointConfig())
    while not cohort.finished:
        predict_noise(sd_pipe, [cohort], 10_000)
        cadence.after_step([cohort], 1, seconds_per_step=0.01)
        sink.seconds_per_image = 0.001  # measured once the first write landed: the budget's interval grows
    first, second, *rest = sink.taken
    assert first == (1, 1) and second[0] == 2 and second[1] > 1  # the promise of the first state was kept
    for (step, interval), (next_step, _) in zip(sink.taken, sink.taken[1:]):
        assert next_step - step <= interval
