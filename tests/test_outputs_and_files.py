"""Output buffers, input buffers and PNG files with metadata."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from embedded_worker import testing
from embedded_worker.outputs import postprocess
from embedded_worker.outputs.store import owner_folder

from .conftest import generate


def test_output_files_carry_their_generation_metadata(make_worker, tmp_path):
    worker = make_worker(output_dir=str(tmp_path / "out"))
    reply = generate(worker, session_id="filed", prompt="a blue whale", seed=31, background=False)
    [reference] = reply["outputs"]
    path = tmp_path / "out" / owner_folder("filed") / f"{reference['output_id']}.png"
    assert reference["path"] == str(path) and path.is_file()
    image = Image.open(path)
    assert image.text["prompt"] == "a blue whale" and image.text["seed"] == "31"
    assert image.text["model"] == "builtin:tiny-sd" and image.text["workflow"] == "img-generation-basic"
    assert np.array_equal(np.asarray(image), worker.get_output(reference["output_id"]))
    assert not list(path.parent.glob("*.partial"))
    worker.delete_session(session_id="filed", force_cleanup=True)
    assert not path.exists()


@pytest.mark.parametrize("image_format", ["jpeg", "webp"])
def test_encode_step_chooses_the_file_format_and_keeps_metadata(make_worker, tmp_path, image_format):
    worker = make_worker(output_dir=str(tmp_path))
    reply = worker.execute_workflow(background=False, domains=[
        {"domain": "inference", "operation": "text2img", "parameters": {"prompt": "fmt", "steps": 3, "seed": 4}},
        {"domain": "postprocessing", "operation": "encode", "parameters": {"format": image_format, "quality": 80}},
    ])
    path = reply["outputs"][0]["path"]
    assert path.endswith(".jpg" if image_format == "jpeg" else ".webp")
    pixels, metadata = postprocess.decode(open(path, "rb").read())
    assert metadata["prompt"] == "fmt" and metadata["seed"] == "4" and pixels.shape == (32, 32, 3)


def test_png_round_trip_is_lossless_with_metadata():
    pixels = np.random.default_rng(1).integers(0, 256, (16, 24, 3), dtype=np.uint8)
    decoded, metadata = postprocess.decode(postprocess.encode(pixels, "png", {"seed": 5, "prompt": "p"}))
    assert np.array_equal(decoded, pixels) and metadata == {"seed": "5", "prompt": "p"}


def test_upscale_uses_lanczos_and_multiplies_the_size():
    pixels = np.zeros((8, 8, 3), dtype=np.uint8)
    pixels[:, 4:] = 255
    bigger = postprocess.upscale(pixels, 4)
    assert bigger.shape == (32, 32, 3) and bigger.flags["C_CONTIGUOUS"] and not bigger.flags["WRITEABLE"]
    edge = bigger[0, 12:20, 0].astype(int)
    assert edge.min() < 5 and edge.max() > 250 and len(set(edge.tolist())) > 2  # a filtered edge, not nearest


def test_inputs_are_checked_and_writable(worker):
    for bad in ((0, 32), (32, 10**6), ("32", 32), (32.5, 32)):
        assert worker.allocate_input(*bad)["error_code"] == "invalid_request"
    assert worker.allocate_input(8, 8, 2)["error_code"] == "invalid_request"
    reply = worker.allocate_input(8, 8, 4)
    assert reply["buffer"].shape == (8, 8, 4) and reply["buffer"].flags["WRITEABLE"]
    assert worker.release_input(reply["input_id"])["released"]
    assert worker.release_input(reply["input_id"])["error_code"] == "not_found"


def test_get_output_of_unknown_ids_is_an_envelope(worker):
    assert worker.get_output("out_nothing")["error_code"] == "not_found"
    assert worker.get_output("")["error_code"] == "invalid_request"
    assert worker.get_output(None)["error_code"] == "invalid_request"


def test_unwritable_output_folder_fails_the_session_and_claims_nothing(make_worker, tmp_path):
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the folder should be")
    worker = make_worker(output_dir=str(blocked))
    reply = generate(worker, background=False)
    assert reply["status"] == "failed" and "outputs could not be written" in reply["error"]
    assert reply["outputs"] == [] and testing.output_store(worker).count() == 0
    assert json.dumps(reply)
