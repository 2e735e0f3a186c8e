"""The shipped shapes model draws what it is asked, through every path the worker offers.

What "follows the prompt" means here, in colour statistics a reader can
check: for "a <colour> <shape> on a <background> background", at least
CENTRE_MIN of the centre's pixels (the 12x12 middle, inside every shape the
dataset draws) are nearest, among the six named colours, to <colour>, and
at least BORDER_MIN of the border's pixels (the outer 4 pixels) are nearest
to <background>. Every check runs over several prompts and seeds and states
the pass rate it needs, measured on these weights when they were trained.
"""

from __future__ import annotations

import numpy as np
import pytest

from embedded_worker import ProcessingWorker, WorkerConfig
from embedded_worker.toy_model import SHAPES_GUIDANCE
from embedded_worker.toy_model.dataset import COLOURS, Scene, render

from .conftest import assert_same_up_to_batch_rounding, session_status, wait_for

STEPS = 20
CENTRE = slice(26, 38)
BORDER = 4
CENTRE_MIN = 0.5
BORDER_MIN = 0.8
PROMPTS = [  # every colour twice, every shape twice
    ("circle", "red", "blue"),
    ("square", "yellow", "black"),
    ("triangle", "white", "green"),
    ("circle", "green", "yellow"),
    ("square", "blue", "white"),
    ("triangle", "black", "red"),
]
SEEDS = (11, 12, 13)
MIN_GUIDED_PASSES = 15  # of 18, at the model's own guidance (measured: 18)
GUIDANCE_MARGIN = 3  # more passes at the model's own guidance than at 1, no guidance (measured: 18 against 14)
NEGATIVE_CASE_PROMPT = "a circle on a blue background"  # the circle's colour left open
NEGATIVE_PROMPT = "a red circle"
NEGATIVE_SEEDS = range(200, 216)
NEGATIVE_DROP = 0.3  # in the mean share of red centre pixels (measured: 0.63 -> 0.0)
LOW_STRENGTH, LOW_STRENGTH_MEAN_DIFF = 0.2, 24.0  # mean absolute difference to the init, of 255
HIGH_STRENGTH = 0.8  # measured: 4 of 4 seeds follow the new prompt at 0.8-1.0, 1 of 4 at 0.6
_NAMES = list(COLOURS)
_PALETTE = np.array([COLOURS[name] for name in _NAMES], dtype=np.float32)


def caption(shape: str, colour: str, background: str) -> str:
    return Scene(shape, colour, background).caption


def nearest_colours(pixels: np.ndarray) -> np.ndarray:
    """Per pixel, the index of the nearest named colour."""
    distances = ((pixels.reshape(-1, 1, 3).astype(np.float32) - _PALETTE) ** 2).sum(axis=2)
    return distances.argmin(axis=1)


def share(pixels: np.ndarray, colour: str) -> float:
    return float((nearest_colours(pixels) == _NAMES.index(colour)).mean())


def border(pixels: np.ndarray) -> np.ndarray:
    frame = np.ones(pixels.shape[:2], dtype=bool)
    frame[BORDER:-BORDER, BORDER:-BORDER] = False
    return pixels[frame]


def follows(pixels: np.ndarray, colour: str, background: str) -> bool:
    return share(pixels[CENTRE, CENTRE], colour) >= CENTRE_MIN and share(border(pixels), background) >= BORDER_MIN


@pytest.fixture(scope="module")
def worker(model_cache):
    worker = ProcessingWorker(WorkerConfig.model_validate({
        "model_cache_dir": str(model_cache), "workflows_dir": None, "state_path": ":memory:",
        "default_model": "builtin:shapes", "scheduling": {"coalesce_wait_ms": 5.0}}))
    yield worker
    assert worker.close(timeout=30)["success"]


def batch_images(worker, items: list[dict], **common) -> list[np.ndarray]:
    """One batch (its images share denoising forwards); the images in item order."""
    reply = worker.execute_batch(workflow_id="img-generation-basic", background=False,
                                 items=[{"item_id": f"i{i}", "parameters": {"steps": STEPS, **common, **item}}
                                        for i, item in enumerate(items)])
    assert reply["status"] == "completed", reply
    by_item = {output["item_id"]: worker.get_output(output["output_id"]) for output in reply["outputs"]}
    return [by_item[f"i{i}"] for i in range(len(items))]


def solo_image(worker, workflow_id: str = "img-generation-basic", **parameters) -> np.ndarray:
    reply = worker.execute_workflow(workflow_id=workflow_id, parameters={"steps": STEPS, **parameters},
                                    background=False)
    assert reply["status"] == "completed", reply
    return worker.get_output(reply["outputs"][0]["output_id"])


def prompt_items(negative: str = "") -> tuple[list[dict], list[tuple]]:
    cases = [(case, seed) for case in PROMPTS for seed in SEEDS]
    items = [{"prompt": caption(*case), "seed": seed, "negative_prompt": negative} for case, seed in cases]
    return items, [case for case, _ in cases]


@pytest.fixture(scope="module")
def guided(worker) -> list[tuple[tuple, np.ndarray]]:
    items, cases = prompt_items()
    return list(zip(cases, batch_images(worker, items)))  # no guidance_scale: the model's own


def passes(results) -> int:
    return sum(follows(image, colour, background) for (_, colour, background), image in results)


def test_text2img_draws_the_named_shape_colour_in_the_centre_and_background_at_the_border(guided):
    assert passes(guided) >= MIN_GUIDED_PASSES, f"{passes(guided)}/{len(guided)} follow their prompt"


def test_a_request_without_guidance_gets_the_models_own(worker, make_worker):
    """builtin:shapes draws best at 3 (README); any other model keeps SD's 7.5; a stated scale is kept."""
    def guidance(on, **parameters) -> float:
        reply = on.execute_workflow(workflow_id="img-generation-basic", background=False,
                                    parameters={"prompt": caption(*PROMPTS[0]), "steps": 2, **parameters})
        return on.output_info(reply["outputs"][0]["output_id"])["metadata"]["guidance_scale"]

    assert guidance(worker) == SHAPES_GUIDANCE == 3.0
    assert guidance(worker, guidance_scale=6.0) == 6.0
    assert guidance(make_worker(), width=32, height=32) == 7.5  # builtin:tiny-sd


def test_guidance_follows_the_prompt_more_often_than_no_guidance(worker, guided):
    items, cases = prompt_items()
    unguided = list(zip(cases, batch_images(worker, items, guidance_scale=1.0)))
    assert passes(guided) >= passes(unguided) + GUIDANCE_MARGIN, (passes(guided), passes(unguided))


def test_a_negative_prompt_naming_the_shape_colour_moves_the_shape_away_from_it(worker):
    items = [{"prompt": NEGATIVE_CASE_PROMPT, "seed": seed} for seed in NEGATIVE_SEEDS]
    plain = batch_images(worker, items)
    avoided = batch_images(worker, [{**item, "negative_prompt": NEGATIVE_PROMPT} for item in items])
    red = lambda images: float(np.mean([share(image[CENTRE, CENTRE], "red") for image in images]))  # noqa: E731
    assert red(avoided) <= red(plain) - NEGATIVE_DROP, (red(plain), red(avoided))


def test_img2img_keeps_the_init_at_low_strength_and_follows_the_new_prompt_at_high(worker):
    init = render(Scene("circle", "red", "blue"))
    allocated = worker.allocate_input(64, 64)
    np.copyto(allocated["buffer"], init)

    def redraw(strength: float, seed: int) -> np.ndarray:
        return solo_image(worker, "img2img-basic", init_image=allocated["input_id"], strength=strength, seed=seed,
                          prompt=caption("square", "yellow", "green"))

    for seed in SEEDS:
        kept = redraw(LOW_STRENGTH, seed)
        assert np.abs(kept.astype(np.int16) - init).mean() <= LOW_STRENGTH_MEAN_DIFF
    followed = sum(follows(redraw(HIGH_STRENGTH, seed), "yellow", "green") for seed in SEEDS)
    assert followed >= len(SEEDS) - 1, f"{followed}/{len(SEEDS)} follow the new prompt at strength {HIGH_STRENGTH}"


def test_upscale_downsampled_back_matches_the_original(worker):
    from PIL import Image

    shape, colour, background = PROMPTS[0]
    parameters = {"prompt": caption(shape, colour, background), "seed": SEEDS[0]}
    original = solo_image(worker, **parameters)
    upscaled = solo_image(worker, "img-upscale-enhance", **parameters, factor=2, sharpness=0.0, contrast=1.0, color=1.0)
    assert upscaled.shape == (128, 128, 3)
    back = np.asarray(Image.fromarray(upscaled).resize((64, 64), Image.Resampling.BOX))
    assert np.abs(back.astype(np.int16) - original).mean() <= 2.0
    assert follows(back, colour, background) == follows(original, colour, background)


def test_shared_forwards_pause_resume_and_preemption_keep_meaning(worker, guided):
    """Images that shared forwards with others, were paused, or were overtaken are their solo runs."""
    firsts = guided[:: len(SEEDS)]  # one image per prompt, made in one shared batch
    for (shape, colour, background), shared in firsts:
        assert_same_up_to_batch_rounding(shared, solo_image(worker, prompt=caption(shape, colour, background),
                                                            seed=SEEDS[0]))

    paused_case, urgent_case = PROMPTS[1], PROMPTS[2]
    paused_parameters = {"prompt": caption(*paused_case), "seed": 99, "steps": 40}
    urgent_parameters = {"prompt": caption(*urgent_case), "seed": 98, "steps": 40}
    expected_paused, expected_urgent = solo_image(worker, **paused_parameters), solo_image(worker, **urgent_parameters)

    background_batch = worker.execute_batch(
        workflow_id="img-generation-basic", priority=1,
        items=[{"item_id": f"i{i}", "parameters": {"prompt": caption(*case), "seed": SEEDS[0], "steps": STEPS}}
               for i, (case, _) in enumerate(firsts)])
    session_id = worker.execute_workflow(workflow_id="img-generation-basic", parameters=paused_parameters,
                                         priority=1)["session_id"]
    wait_for(lambda: session_status(worker, session_id)["detailed_progress"]["substep_progress"] > 0.1)
    assert worker.control_session(session_id=session_id, action="pause")["status"] == "paused"
    urgent = worker.execute_workflow(workflow_id="img-generation-basic", parameters=urgent_parameters, priority=10,
                                     background=False)
    worker.control_session(session_id=session_id, action="resume")
    wait_for(lambda: session_status(worker, session_id)["status"] == "completed")
    batch_id = background_batch["batch_id"]
    wait_for(lambda: worker.get_batch_status(batch_id=batch_id)["status"] == "completed")

    resumed = worker.get_output(session_status(worker, session_id)["outputs"][0]["output_id"])
    assert_same_up_to_batch_rounding(resumed, expected_paused)
    assert_same_up_to_batch_rounding(worker.get_output(urgent["outputs"][0]["output_id"]), expected_urgent)
    by_item = {o["item_id"]: o["output_id"] for o in worker.get_batch_status(batch_id=batch_id)["outputs"]}
    for i, (_, shared) in enumerate(firsts):
        assert_same_up_to_batch_rounding(worker.get_output(by_item[f"i{i}"]), shared)
