"""Safe inputs: paths confined to the roots, workflow files are data, one failing step fails one session."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from embedded_worker import postprocess

from .conftest import generate


def test_image_paths_are_confined_to_the_allowed_roots(make_worker, tmp_path):
    root = tmp_path / "inputs"
    root.mkdir()
    outside = tmp_path / "secret.png"
    Image.fromarray(np.full((32, 32, 3), 200, np.uint8)).save(outside)
    Image.fromarray(np.full((32, 32, 3), 90, np.uint8)).save(root / "ok.png")
    os.symlink(outside, root / "link.png")
    worker = make_worker(allowed_roots=[str(root)])

    def img2img(path: str) -> dict:
        return worker.execute_workflow(workflow_id="img2img-basic", background=False,
                                       parameters={"init_image": path, "steps": 3, "seed": 1})

    assert img2img(str(root / "ok.png"))["status"] == "completed"
    for escape in (str(outside), str(root / ".." / "secret.png"), str(root / "link.png"), "/etc/passwd",
                   "~/../../etc/passwd"):
        reply = img2img(escape)
        assert reply["error_code"] == "invalid_request" and "outside the allowed roots" in reply["error"], escape
    missing = img2img(str(root / "missing.png"))
    assert missing["error_code"] == "invalid_request" and "cannot read" in missing["error"]
    (root / "not-an-image.png").write_text("hello")
    assert "not a readable image" in img2img(str(root / "not-an-image.png"))["error"]


def test_workflow_files_are_data_never_executed(make_worker, tmp_path):
    folder = tmp_path / "workflows"
    folder.mkdir()
    marker = tmp_path / "pwned"
    payload = f"__import__('os').system('touch {marker}')"
    (folder / "sneaky.toml").write_text(f'''
id = "sneaky"
name = "{payload}"
description = "{{{{ {payload} }}}}"

[[steps]]
order = 1
domain = "inference"
operation = "text2img"

[[parameters]]
name = "prompt"
type = "string"
default = "{payload}"
''')
    worker = make_worker(workflows_dir=str(folder))
    reply = worker.execute_workflow(workflow_id="sneaky", background=False, parameters={"steps": 3})
    assert reply["status"] == "completed"
    assert worker.output_info(reply["outputs"][0]["output_id"])["metadata"]["prompt"] == payload
    assert not marker.exists()


def test_an_exception_inside_one_step_fails_only_that_session_with_a_traceback(worker, monkeypatch):
    real_enhance = postprocess.enhance

    def enhance_or_fail(pixels, sharpness, contrast, color):  # a fault injected into one request's step
        if sharpness == 4.25:
            raise ValueError("injected fault in enhance")
        return real_enhance(pixels, sharpness, contrast, color)

    monkeypatch.setattr(postprocess, "enhance", enhance_or_fail)
    bad = worker.execute_workflow(workflow_id="img-upscale-enhance", background=True,
                                  parameters={"steps": 3, "sharpness": 4.25})
    good = worker.execute_workflow(workflow_id="img-upscale-enhance", background=False,
                                   parameters={"steps": 3, "sharpness": 1.0})
    assert good["status"] == "completed"
    worker._engine.book.wait_until(
        lambda: worker.get_session_status(session_id=bad["session_id"])["status"] == "failed", 60)
    failed = worker.get_session_status(session_id=bad["session_id"])
    assert failed["error_code"] == "internal"
    assert failed["error"] == "postprocessing.enhance: ValueError: injected fault in enhance"
    [detail] = failed["error_details"]
    assert detail["operation"] == "enhance" and detail["domain"] == "postprocessing"
    assert generate(worker, background=False)["status"] == "completed"


def test_step_failures_carry_a_short_traceback(worker, monkeypatch):
    def broken(pixels, factor):
        raise RuntimeError("upscaler exploded")

    monkeypatch.setattr(postprocess, "upscale", broken)
    reply = worker.execute_workflow(workflow_id="img-upscale-enhance", background=False, parameters={"steps": 3})
    assert reply["status"] == "failed"
    trace = reply["error_details"][0]
    assert "upscaler exploded" in trace["error"]
    assert Path(__file__).name not in str(reply) or "broken" in str(reply)
