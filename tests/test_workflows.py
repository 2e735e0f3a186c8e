"""Built-in workflows end to end, user workflow files, and inline coordination."""

from __future__ import annotations

import json
import shutil

import numpy as np

from embedded_worker import testing
from embedded_worker.diffusion.tiny_model import ensure_tiny_model
from embedded_worker.workflows.catalog import BUILTIN_DIR, read_workflow_file

from .conftest import generate


def test_builtin_files_are_valid_workflows():
    for path in BUILTIN_DIR.glob("*.json"):
        assert read_workflow_file(path).id == path.stem


def test_a_workflows_parameter_model_is_built_once_not_per_request(worker, monkeypatch):
    """Building the pydantic model of a workflow's parameters took 2-15 ms; every item of a batch and every
    session built it again (a batch of 8 spent more on it than on its forwards, on the tiny transformers)."""
    from embedded_worker.workflows import definition

    built = []
    real = definition.create_model
    monkeypatch.setattr(definition, "create_model", lambda *args, **kw: built.append(args[0]) or real(*args, **kw))
    batch = worker.execute_batch(workflow_id="img-generation-basic", background=False,
                                 parameters={"prompt": "a fox", "steps": 1, "seed": 1, "total_images": 4})
    assert batch["status"] == "completed", batch
    assert generate(worker, steps=1)["status"] == "completed"
    assert len(built) <= 1, built


def test_img2img_from_an_earlier_output(worker):
    source = generate(worker, background=False)
    reply = worker.execute_workflow(workflow_id="img2img-basic", background=False, parameters={
        "init_image": source["outputs"][0]["output_id"], "prompt": "watercolour", "strength": 0.5, "steps": 6,
        "seed": 3})
    assert reply["status"] == "completed", reply
    output = worker.get_output(reply["outputs"][0]["output_id"])
    assert output.shape == (32, 32, 3)
    assert not np.array_equal(output, worker.get_output(source["outputs"][0]["output_id"]))


def test_img2img_from_a_host_filled_input_buffer(worker):
    allocated = worker.allocate_input(32, 32)
    buffer = allocated["buffer"]
    assert buffer.flags["WRITEABLE"] and buffer.flags["C_CONTIGUOUS"] and buffer.shape == (32, 32, 3)
    buffer[:] = np.linspace(0, 255, 32, dtype=np.uint8)[None, :, None]  # the host writes in place
    reply = worker.execute_workflow(workflow_id="img2img-basic", background=False,
                                    parameters={"init_image": allocated["input_id"], "strength": 0.3, "steps": 10,
                                                "seed": 1})
    assert reply["status"] == "completed", reply
    assert worker.release_input(allocated["input_id"])["released"]


def test_upscale_enhance_generates_or_takes_an_image(worker):
    generated = worker.execute_workflow(workflow_id="img-upscale-enhance", background=False,
                                        parameters={"steps": 4, "seed": 2, "factor": 4})
    assert generated["status"] == "completed" and generated["outputs"][0]["width"] == 128
    assert generated["total_steps"] == 4
    taken = worker.execute_workflow(workflow_id="img-upscale-enhance", background=False,
                                    parameters={"init_image": generated["outputs"][0]["output_id"], "factor": 2})
    assert taken["status"] == "completed" and taken["outputs"][0]["width"] == 256
    assert taken["total_steps"] == 3  # the generate step was skipped


def test_a_user_workflow_file_loads_and_a_broken_one_is_reported(make_worker, tmp_path):
    folder = tmp_path / "workflows"
    folder.mkdir()
    (folder / "tiny-square.toml").write_text("""
id = "tiny-square"
name = "Tiny square, upscaled"
category = "user"
estimated_duration = 2.0

[[steps]]
order = 1
domain = "inference"
operation = "text2img"

[[steps]]
order = 2
domain = "postprocessing"
operation = "upscale"
parameters = { factor = 2 }

[[parameters]]
name = "prompt"
type = "string"
default = "a small red square"

[[parameters]]
name = "steps"
type = "integer"
default = 4
maximum = 10

[[parameters]]
name = "seed"
type = "integer"
""")
    (folder / "broken.json").write_text(json.dumps({"id": "broken", "name": "x", "steps": [
        {"order": 1, "domain": "inference", "operation": "teleport"}]}))
    (folder / "garbage.json").write_text("{not json")
    worker = make_worker(workflows_dir=str(folder))

    listing = worker.get_workflows()
    assert "tiny-square" in {w["id"] for w in listing["workflows"]}
    reasons = {p["path"].rsplit("/", 1)[-1]: p["reason"] for p in listing["problems"]}
    assert "unknown operation 'inference.teleport'" in reasons["broken.json"]
    assert "cannot parse" in reasons["garbage.json"]
    reply = worker.execute_workflow(workflow_id="tiny-square", background=False, parameters={"seed": 1})
    assert reply["status"] == "completed" and reply["outputs"][0]["width"] == 64
    assert worker.execute_workflow(workflow_id="tiny-square", parameters={"steps": 11})["error_code"] == "invalid_request"
    refused = worker.execute_workflow(workflow_id="tiny-square", parameters={"width": 32})  # it takes no width
    assert refused["error"] == "parameters.width: unknown field (accepted here: prompt, steps, seed)", refused
    assert worker.execute_workflow(workflow_id="broken")["error_code"] == "not_found"


def test_a_workflow_needing_an_unknown_model_is_not_available(make_worker, tmp_path):
    folder = tmp_path / "workflows"
    folder.mkdir()
    (folder / "needs.json").write_text(json.dumps({"id": "needs-sdxl-real", "name": "n", "required_models": ["sdxl"],
                                                    "steps": [{"order": 1, "domain": "inference",
                                                               "operation": "text2img"}]}))
    worker = make_worker(workflows_dir=str(folder))
    assert worker.get_workflow(workflow_id="needs-sdxl-real")["workflow"]["is_available"] is False
    reply = worker.execute_workflow(workflow_id="needs-sdxl-real")
    assert reply["error_code"] == "unavailable"
    assert reply["error"] == "Workflow 'needs-sdxl-real' is not currently available"


def test_sequential_coordination_feeds_each_operation_the_previous_outputs(worker):
    reply = worker.execute_workflow(coordination_id="coord-seq", coordination_mode="sequential", background=False,
                                    domains=[
                                        {"domain": "inference", "operation": "text2img",
                                         "parameters": {"prompt": "a kite", "steps": 4, "seed": 5, "num_images": 2}},
                                        {"domain": "postprocessing", "operation": "upscale", "parameters": {"factor": 2}},
                                        {"domain": "postprocessing", "operation": "enhance", "parameters": None},
                                    ])
    assert reply["session_id"] == "coord-seq" and reply["status"] == "completed", reply
    assert [(o["width"], o["seed"]) for o in reply["outputs"]] == [(64, 5), (64, 6)]


def test_parallel_coordination_runs_independent_operations_and_aggregates_errors(worker):
    source = generate(worker, background=False)["outputs"][0]["output_id"]
    ok = worker.execute_workflow(coordination_mode="parallel", background=False, domains=[
        {"domain": "inference", "operation": "text2img", "parameters": {"prompt": "a", "steps": 3, "seed": 1}},
        {"domain": "postprocessing", "operation": "upscale", "parameters": {"init_image": source, "factor": 4}},
    ])
    assert ok["status"] == "completed" and sorted(o["width"] for o in ok["outputs"]) == [32, 128]

    failed = worker.execute_workflow(coordination_mode="parallel", background=False, domains=[
        {"domain": "inference", "operation": "text2img", "parameters": {"prompt": "a", "steps": 3, "seed": 1}},
        {"domain": "postprocessing", "operation": "resize",
         "parameters": {"init_image": source, "width": 1, "height": 0}},
    ])
    assert failed["error_code"] == "invalid_request"  # found before anything ran

    cache = worker.config.resolved_model_cache_dir
    for name in ("missing-a", "missing-b"):  # configs that plan, weights that are not there to load
        shutil.copytree(ensure_tiny_model("builtin:tiny-sd", cache), cache / name,
                        ignore=shutil.ignore_patterns("*.safetensors"), dirs_exist_ok=True)
    testing.models(worker).register({"broken-a": cache / "missing-a", "broken-b": cache / "missing-b"})
    both = worker.execute_workflow(coordination_mode="parallel", background=False, domains=[
        {"domain": "inference", "operation": "text2img", "parameters": {"prompt": "a", "model": "broken-a"}},
        {"domain": "inference", "operation": "text2img", "parameters": {"prompt": "b", "model": "broken-b"}},
        {"domain": "postprocessing", "operation": "upscale", "parameters": {"init_image": source}},
    ])
    assert both["status"] == "failed"
    failures = both["error_details"]
    assert [(f["domain"], f["operation"]) for f in failures] == [("inference", "text2img")] * 2
    assert "missing-a" in failures[0]["error"] and "missing-b" in failures[1]["error"]
