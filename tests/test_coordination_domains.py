"""Cross-domain coordination as the design document writes it: model, device, inference and
postprocessing operations as steps of one session."""

from __future__ import annotations

import datetime as dt
import json
import shutil
import threading
import time

import numpy as np
import pytest

from embedded_worker import testing
from embedded_worker.diffusion.tiny_model import ensure_tiny_model
from embedded_worker.lifecycle.planning import PlannedStep, RunPlan
from embedded_worker.lifecycle.state import WorkState
from embedded_worker.workflows.operations import OPERATIONS, GenerateParams, ModelParams

BATCH_CONFIG = {"total_images": 3, "preferred_batch_size": 2, "max_batch_size": 2, "enable_dynamic_sizing": True,
                "memory_threshold": 0.8, "parallel_processing": False}


@pytest.fixture
def model_copy(model_cache, tmp_path):
    """A model no worker holds yet: the tiny model saved like any local diffusers model."""
    folder = tmp_path / "models" / "my-sd"
    shutil.copytree(ensure_tiny_model("builtin:tiny-sd", model_cache), folder)
    return folder


def document_example(model_folder, mode: str = "sequential") -> dict:
    """The document's own request: model.load_model -> inference.batch_process -> postprocessing.enhance."""
    return {
        "coordination_id": "coord-doc",
        "workflow_id": "sd-generate-enhance",
        "domains": [
            {"domain": "model", "operation": "load_model", "parameters": {"model_id": "my-sd", "path": str(model_folder)}},
            {"domain": "inference", "operation": "batch_process", "parameters": {
                "batch_id": "coord-batch", "batch_config": BATCH_CONFIG,
                "generation_params": {"prompt": "a harbour at dawn", "seed": 11, "steps": 3}}},
            {"domain": "postprocessing", "operation": "enhance", "parameters": {"sharpness": 1.5, "contrast": 1.2}},
        ],
        "coordination_mode": mode,
    }


def when(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00"))


def test_the_documents_sequential_example_as_json_text_loads_then_batches_then_enhances(make_worker, model_copy):
    worker = make_worker(allowed_roots=[str(model_copy.parent)])
    assert not any(m["loaded_on"] for m in worker.execute("model.list", {})["models"] if m["model_id"] == "my-sd")
    reply = json.loads(worker.execute("execute_workflow", json.dumps(document_example(model_copy))))
    assert reply["success"] and reply["session_id"] == "coord-doc", reply
    assert [s["domain"] + "." + s["operation"] for s in reply["workflow"]["steps"]] == [
        "model.load_model", "inference.batch_process", "postprocessing.enhance"]
    testing.wait_until(worker, lambda: worker.get_session_status("coord-doc")["status"] == "completed", 120)
    status = worker.get_session_status({"session_id": "coord-doc", "action": "get_status"})
    assert (status["status"], status["progress"], status["total_steps"]) == ("completed", 100, 3)

    assert [o["seed"] for o in status["outputs"]] == [11, 12, 13]  # total_images images, seeds seed + i
    for output in status["outputs"]:
        info = worker.output_info(output["output_id"])
        assert info["metadata"]["model"] == "my-sd"  # the batch ran on the model the step before loaded
        assert worker.get_output(output["output_id"]).shape == (32, 32, 3)

    load, batch, enhance = status["step_results"]
    assert (load["operation"], load["status"], load["result"]["loaded"]) == ("load_model", "completed", True)
    assert load["result"]["loaded_on"] == [w["name"] for w in worker.execute("device.status", {})["workers"]]
    assert when(load["completed_at"]) <= when(batch["started_at"])  # loaded before the step after it began
    assert (batch["status"], batch["images"], enhance["images"]) == ("completed", 3, 3)


def test_enhance_works_on_the_batch_images(make_worker, model_copy):
    worker = make_worker(allowed_roots=[str(model_copy.parent)])
    plain = document_example(model_copy)
    plain["domains"] = plain["domains"][:2]
    plain["coordination_id"] = "no-enhance"
    plain["domains"][1]["parameters"]["batch_id"] = "no-enhance-batch"  # a batch id names one batch
    unenhanced = worker.execute_workflow({**plain, "background": False})
    enhanced = worker.execute_workflow({**document_example(model_copy), "background": False})
    assert unenhanced["status"] == enhanced["status"] == "completed"
    for before, after in zip(unenhanced["outputs"], enhanced["outputs"]):
        assert before["seed"] == after["seed"]
        assert not np.array_equal(worker.get_output(before["output_id"]), worker.get_output(after["output_id"]))


def test_device_steps_report_into_the_step_results(make_worker, model_copy):
    worker = make_worker(allowed_roots=[str(model_copy.parent)])
    request = document_example(model_copy)
    request["domains"][1:1] = [{"domain": "device", "operation": "get_status", "parameters": {}},
                               {"domain": "device", "operation": "get_memory", "parameters": None}]
    reply = worker.execute_workflow({**request, "background": False})
    assert reply["status"] == "completed", reply
    steps = {s["order"]: s for s in reply["step_results"]}
    device_status, memory = steps[2]["result"], steps[3]["result"]
    assert all("my-sd" in w["loaded_models"] for w in device_status["workers"])  # the load took effect first
    assert all(m["total_bytes"] > 0 for m in memory["memory"].values())
    assert [o["seed"] for o in reply["outputs"]] == [11, 12, 13]  # the images passed the device steps untouched


def test_parallel_operations_on_a_loaded_model_wait_for_the_load(make_worker, model_copy):
    worker = make_worker(allowed_roots=[str(model_copy.parent)])
    source = worker.execute("inference.text2img", {"prompt": "x", "steps": 2, "seed": 1, "background": False})
    request = document_example(model_copy, mode="parallel")
    request["domains"][2] = {"domain": "postprocessing", "operation": "upscale",
                             "parameters": {"init_image": source["outputs"][0]["output_id"], "factor": 2}}
    reply = worker.execute("execute_workflow", {**request, "background": False})
    assert reply["status"] == "completed", reply
    load, batch, upscale = reply["step_results"]
    assert when(load["completed_at"]) <= when(batch["started_at"])
    assert sorted((o["width"], o["seed"]) for o in reply["outputs"]) == [(32, 11), (32, 12), (32, 13), (64, 1)]


def test_a_model_that_fails_to_load_fails_the_session_with_the_step_named(make_worker, model_copy):
    weights = model_copy / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # configs fine, weights broken: fails only when loaded
    worker = make_worker(allowed_roots=[str(model_copy.parent)])
    reply = worker.execute_workflow({**document_example(model_copy), "background": False})
    assert (reply["status"], reply["error_code"]) == ("failed", "unavailable"), reply
    [failure] = reply["error_details"]
    assert (failure["domain"], failure["operation"]) == ("model", "load_model")
    assert "model 'my-sd' could not be loaded" in failure["error"]
    assert [s["status"] for s in reply["step_results"]] == ["failed", "cancelled", "cancelled"]
    model = worker.execute("model.get_status", {"session_id": "coord-doc", "domains": ["model"]})
    [used] = model["models"]
    assert (used["model_id"], used["state"]) == ("my-sd", "failed") and "could not be loaded" in used["error"]


def test_unknown_steps_and_bad_counts_are_refused_before_anything_runs(worker):
    unknown = worker.execute_workflow(domains=[{"domain": "model", "operation": "teleport", "parameters": {}}])
    assert unknown["error_code"] == "invalid_request" and "unknown operation 'model.teleport'" in unknown["error"]
    bad_domain = worker.execute_workflow(domains=[{"domain": "weather", "operation": "x"}])
    assert bad_domain["error_code"] == "invalid_request" and "domains.0.domain" in bad_domain["error"]
    counts = worker.execute_workflow(domains=[{"domain": "inference", "operation": "batch_process", "parameters": {
        "batch_config": {"total_images": 4}, "generation_params": {"prompt": "x", "total_images": 2}}}])
    assert counts["error_code"] == "invalid_request"
    assert "batch_config.total_images (4) and generation_params.total_images (2) disagree" in counts["error"]
    assert worker.list_sessions()["total"] == 0


def test_a_parallel_operation_waits_only_for_the_model_step_it_names(make_worker, model_copy):
    """A long generation on the default model beside a load of my-sd and a short generation on my-sd: the
    short one waits for the load only, so it launches while the long one is held on the device (it waited
    for the whole first wave, the long generation included)."""
    worker = make_worker(allowed_roots=[str(model_copy.parent)])
    reply = worker.execute_workflow(coordination_id="deps", coordination_mode="parallel", domains=[
        {"domain": "inference", "operation": "text2img", "parameters": {"prompt": "long", "steps": 20, "seed": 1,
                                                                        "model": "builtin:tiny-sd"}},
        {"domain": "model", "operation": "load_model", "parameters": {"model_id": "my-sd", "path": str(model_copy)}},
        {"domain": "inference", "operation": "text2img",
         "parameters": {"prompt": "short", "steps": 2, "seed": 2, "model": "my-sd"}}])
    assert reply["success"], reply

    def step_status(order: int) -> str:
        return worker.get_session_status(session_id="deps")["step_results"][order - 1]["status"]

    seen: list[tuple[bool, str]] = []

    def hold_the_long_generation(device) -> None:
        if seen:
            return
        # the load runs on this thread between two forwards: go on until it is queued, then until it is done
        for _ in range(6000):
            if step_status(2) == "completed" or testing.calls_waiting(device):
                break
            time.sleep(0.005)
        if step_status(2) == "completed":  # loaded: the device stays here until the step on my-sd launched
            seen.append((testing.wait_until(worker, lambda: step_status(3) != "waiting", 30), step_status(1)))

    remove = testing.on_step(worker, hold_the_long_generation)
    try:
        assert testing.wait_until(worker, lambda: worker.get_session_status(session_id="deps")["status"]
                                  in ("completed", "failed"), 300)
    finally:
        remove()
    assert seen == [(True, "running")]  # launched while the long generation had not ended
    done = worker.get_session_status(session_id="deps")
    assert done["status"] == "completed", done
    assert sorted((o["seed"], worker.output_info(o["output_id"])["metadata"]["model"]) for o in done["outputs"]) \
        == [(1, "builtin:tiny-sd"), (2, "my-sd")]


def test_a_plans_estimate_is_its_longest_chain_of_dependent_steps():
    """A long generation beside a load and a short generation on that model runs as long as the long one
    (waves counted the long one, then the short one after it); in sequence every step adds up."""
    def generate(order: int, steps: int, after: tuple[int, ...]) -> PlannedStep:
        return PlannedStep(OPERATIONS["inference.text2img"], GenerateParams(prompt="x", steps=steps), None, order,
                           after)

    load = PlannedStep(OPERATIONS["model.load_model"], ModelParams(model_id="m"), None, 2, ())
    parallel = RunPlan([generate(1, 30, ()), load, generate(3, 5, (2,))], True, "m", None)
    assert parallel.run_steps == 30
    load.after = (1,)
    sequential = RunPlan([generate(1, 30, ()), load, generate(3, 5, (2,))], False, "m", None)
    assert sequential.run_steps == 36


def test_a_parallel_step_made_ready_while_pausing_waits_for_the_resume(make_worker, model_copy):
    """The load ends while the session is pausing: the generation waiting for it does not launch, the session
    is paused; the resume launches it."""
    worker = make_worker(allowed_roots=[str(model_copy.parent)])
    device_free = threading.Event()
    busy = testing.device_workers(worker)[0].call(lambda _device: device_free.wait(300))  # the load queues behind
    reply = worker.execute_workflow(coordination_id="held", coordination_mode="parallel", domains=[
        {"domain": "model", "operation": "load_model", "parameters": {"model_id": "my-sd", "path": str(model_copy)}},
        {"domain": "inference", "operation": "text2img",
         "parameters": {"prompt": "x", "steps": 2, "seed": 4, "model": "my-sd"}}])
    assert reply["success"], reply
    paused: list[dict] = []
    pausing = threading.Thread(target=lambda: paused.append(worker.control_session(session_id="held",
                                                                                  action="pause")))
    pausing.start()
    assert testing.wait_until(worker, lambda: testing.run_of(worker, "held").state is WorkState.PAUSING, 60)
    device_free.set()
    busy.result(60)
    pausing.join(300)
    assert paused[0]["status"] == "paused", paused
    assert [s["status"] for s in paused[0]["step_results"]] == ["completed", "waiting"]
    worker.control_session(session_id="held", action="resume")
    assert testing.wait_until(worker, lambda: worker.get_session_status(session_id="held")["status"]
                              == "completed", 300)
