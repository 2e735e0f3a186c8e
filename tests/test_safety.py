"""Safe inputs: paths confined to the roots, workflow files are data, one failing step fails one session."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from embedded_worker import testing
from embedded_worker.outputs import postprocess

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

[[parameters]]
name = "steps"
type = "integer"
default = 3
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
    testing.wait_until(worker,
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


TRICKY_IDS = ["../../escaped", "/tmp/absolute-escape", "..", "C:\\windows\\escape", "a/../../b", "🦊" * 200]


def test_ids_never_decide_where_files_land(model_cache, tmp_path):
    """Caller ids are stored and answered as given, but every file (image and raw pixels) lands in a
    folder named from a hash of the id, inside the configured folders."""
    from embedded_worker import ProcessingWorker, WorkerConfig

    home = tmp_path / "home"
    config = WorkerConfig(model_cache_dir=str(model_cache), state_path=str(home / "state.sqlite3"),
                          default_model="builtin:tiny-sd")
    with ProcessingWorker(config) as worker:
        for session_id in TRICKY_IDS:
            reply = generate(worker, session_id=session_id, steps=2, background=False)
            assert reply["status"] == "completed" and reply["session_id"] == session_id
            assert session_status_of(worker, session_id) == "completed"
        batch = worker.execute_batch(batch_id="../batch-escape", workflow_id="img-generation-basic",
                                     background=False, items=[{"item_id": "../../item", "parameters": {}}],
                                     parameters={"prompt": "b", "steps": 2})
        assert batch["status"] == "completed"
        written = [Path(o["path"]) for s in TRICKY_IDS for o in worker.get_session_status(s)["outputs"]]
        written += [Path(o["path"]) for o in batch["outputs"]]
    everything = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert everything and all(p.is_relative_to(home) for p in everything)
    assert not Path("/tmp/absolute-escape").exists()
    for path in written:
        assert path.resolve().parent.parent == (home / "outputs").resolve()
    assert len({p.parent for p in written}) == len(TRICKY_IDS) + 1  # one folder per owner, none shared


def session_status_of(worker, session_id: str) -> str:
    return worker.get_session_status(session_id)["status"]


def test_an_init_image_that_is_no_regular_file_is_refused_without_blocking(make_worker, tmp_path):
    import threading

    root = tmp_path / "inputs"
    root.mkdir()
    os.mkfifo(root / "pipe.png")
    worker = make_worker(allowed_roots=[str(root)])
    replies: list[dict] = []
    caller = threading.Thread(target=lambda: replies.append(worker.execute_workflow(
        workflow_id="img2img-basic", parameters={"init_image": str(root / "pipe.png"), "steps": 2})))
    caller.start()
    caller.join(timeout=60)
    assert not caller.is_alive(), "the request blocked on the FIFO"
    assert replies[0]["error_code"] == "invalid_request" and "not a regular file" in replies[0]["error"]
    reply = worker.execute_workflow(workflow_id="img2img-basic", parameters={"init_image": str(root)})
    assert reply["error_code"] == "invalid_request" and "not a regular file" in reply["error"]


def test_upscale_keeps_to_the_largest_image_side(make_worker):
    worker = make_worker(limits={"max_image_side": 64})
    small = worker.allocate_input(32, 32)
    reply = worker.execute_workflow(workflow_id="img-upscale-enhance", background=False,
                                    parameters={"init_image": small["input_id"], "factor": 2})
    assert reply["status"] == "completed" and reply["outputs"][0]["width"] == 64
    large = worker.allocate_input(48, 40)
    reply = worker.execute_workflow(workflow_id="img-upscale-enhance", background=False,
                                    parameters={"init_image": large["input_id"], "factor": 2})
    assert reply["status"] == "failed" and reply["error_code"] == "invalid_request"
    assert "exceeds the limit of 64 pixels" in reply["error"] and not reply["outputs"]


BAD_WORKFLOW_FILES = {
    "deep.json": '{"id": "deep", "name": "d", "steps": [{"order": 1, "domain": "inference", "operation": '
                 '"text2img", "parameters": {"x": ' + "[" * 3000 + "]" * 3000 + '}}]}',
    "infinite.json": '{"id": "infinite", "name": "i", "estimated_duration": Infinity, "steps": [{"order": 1, '
                     '"domain": "inference", "operation": "text2img"}]}',
    "infinite.toml": 'id = "infinite-toml"\nname = "i"\nestimated_duration = inf\n'
                     '[[steps]]\norder = 1\ndomain = "inference"\noperation = "text2img"\n',
    "choices.json": '{"id": "choices", "name": "c", "steps": [{"order": 1, "domain": "inference", "operation": '
                    '"text2img"}], "parameters": [{"name": "style", "type": "string", "choices": [{"a": 1}]}]}',
    "private.json": '{"id": "private", "name": "p", "steps": [{"order": 1, "domain": "inference", "operation": '
                    '"text2img"}], "parameters": [{"name": "_x", "type": "string"}]}',
    "bounded-text.json": '{"id": "bounded-text", "name": "b", "steps": [{"order": 1, "domain": "inference", '
                         '"operation": "text2img"}], "parameters": [{"name": "prompt", "type": "string", '
                         '"minimum": 3}]}',
    "step-typo.json": '{"id": "step-typo", "name": "t", "steps": [{"order": 1, "domain": "inference", '
                      '"operation": "text2img", "parameters": {"stpes": 3}}]}',
    "bad-default.json": '{"id": "bad-default", "name": "b", "steps": [{"order": 1, "domain": "inference", '
                        '"operation": "text2img"}], "parameters": [{"name": "steps", "type": "integer", '
                        '"default": "many"}]}',
}


def test_a_bad_workflow_file_is_a_problem_of_that_file_only(make_worker, tmp_path):
    """Files that would break the catalog (deep nesting, non-finite numbers, schemas pydantic refuses
    only when built) are listed as problems, at start and when dropped in later; the built-ins, status
    and every reply stay valid JSON."""
    import json

    folder = tmp_path / "workflows"
    folder.mkdir()
    first, *later = sorted(BAD_WORKFLOW_FILES)
    (folder / first).write_text(BAD_WORKFLOW_FILES[first])
    worker = make_worker(workflows_dir=str(folder))  # a bad file present at start
    for name in later:
        (folder / name).write_text(BAD_WORKFLOW_FILES[name])
    listed = json.loads(worker.execute("get_workflows", "{}"))
    assert listed["success"], listed
    assert {Path(p["path"]).name for p in listed["problems"]} == set(BAD_WORKFLOW_FILES)
    assert {w["id"] for w in listed["workflows"]} == {"img-generation-basic", "img2img-basic", "img-upscale-enhance"}
    assert json.loads(worker.execute("get_status", "{}"))["success"]
    assert generate(worker, steps=2, background=False)["status"] == "completed"
