"""device.*, model.*, inference.* and postprocessing.* commands, and loading real model folders."""

from __future__ import annotations

import shutil
import threading

import pytest
import torch

from embedded_worker.diffusion.tiny_model import ensure_tiny_model

from .conftest import pipeline_of, wait_for


@pytest.fixture
def model_copy(model_cache, tmp_path):
    """A 'real' model folder: the tiny model saved like any local diffusers model."""
    folder = tmp_path / "models" / "my-sd"
    shutil.copytree(ensure_tiny_model("builtin:tiny-sd", model_cache), folder)
    return folder


def test_device_commands_describe_the_cpu(worker):
    devices = worker.execute("device.list_devices", {})["devices"]
    assert devices[0]["type"] == "cpu" and devices[0]["dtype"] == "float32"
    memory = worker.execute("device.memory", {})["memory"]
    assert all(m["total_bytes"] > m["used_bytes"] > 0 for m in memory.values())
    status = worker.execute("device.status", {})
    assert status["workers"][0]["name"].startswith("ew-device-cpu")


def test_a_local_model_folder_loads_runs_and_unloads(make_worker, model_copy):
    worker = make_worker(allowed_roots=[str(model_copy.parent)])
    loaded = worker.execute("model.load", {"model_id": "my-sd", "path": str(model_copy)})
    assert loaded["success"], loaded
    assert any(m["model_id"] == "my-sd" and m["loaded_on"] for m in loaded["models"])
    reply = worker.execute("inference.text2img", {"prompt": "x", "model": "my-sd", "steps": 3, "seed": 3,
                                                  "background": False})
    assert reply["status"] == "completed" and reply["outputs"][0]["width"] == 32
    assert worker.execute("model.unload", {"model_id": "my-sd"})["unloaded_from"] == 1
    assert not any(m["loaded_on"] for m in worker.execute("model.list", {})["models"] if m["model_id"] == "my-sd")


def test_pickle_weights_are_refused_before_anything_is_unpickled(make_worker, model_copy):
    unet = model_copy / "unet"
    from safetensors.torch import load_file

    state = load_file(unet / "diffusion_pytorch_model.safetensors")
    (unet / "diffusion_pytorch_model.safetensors").unlink()
    torch.save(state, unet / "diffusion_pytorch_model.bin")
    worker = make_worker(allowed_roots=[str(model_copy.parent)])
    reply = worker.execute("model.load", {"model_id": "pickled", "path": str(model_copy)})
    assert reply["error_code"] == "invalid_request"
    assert "only pickle weights" in reply["error"] and "only safetensors are loaded" in reply["error"]


def test_model_paths_outside_the_allowed_roots_are_refused(make_worker, model_copy, tmp_path):
    worker = make_worker(allowed_roots=[str(tmp_path / "elsewhere")])
    reply = worker.execute("model.load", {"model_id": "x", "path": str(model_copy)})
    assert reply["error_code"] == "invalid_request" and "outside the allowed roots" in reply["error"]
    escape = tmp_path / "elsewhere" / ".." / "models" / "my-sd"
    assert worker.execute("model.load", {"model_id": "x", "path": str(escape)})["error_code"] == "invalid_request"


def test_a_model_that_fails_to_load_gives_a_clear_error_and_nothing_else_fails(make_worker, model_copy, tmp_path):
    incomplete = tmp_path / "incomplete"
    incomplete.mkdir()
    (incomplete / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    weights = model_copy / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated: configs fine, weights broken
    worker = make_worker(models={"incomplete": str(incomplete), "truncated": str(model_copy)})

    refused = worker.execute("inference.text2img", {"prompt": "x", "model": "incomplete"})
    assert refused["error_code"] == "invalid_request" and "is incomplete" in refused["error"]
    failed = worker.execute("inference.text2img", {"prompt": "x", "model": "truncated", "background": False})
    assert failed["status"] == "failed" and failed["error_code"] == "unavailable", failed
    assert "model 'truncated' could not be loaded" in failed["error"]
    assert worker.execute("model.load", {"model_id": "truncated"})["success"] is False
    healthy = worker.execute("inference.text2img", {"prompt": "x", "steps": 3, "background": False})
    assert healthy["status"] == "completed"  # the failure stayed with its session


def test_postprocessing_commands_take_an_output(worker):
    source = worker.execute("inference.text2img", {"prompt": "x", "steps": 3, "background": False})
    output_id = source["outputs"][0]["output_id"]
    bigger = worker.execute("postprocessing.upscale", {"output_id": output_id, "factor": 2, "background": False})
    assert bigger["outputs"][0]["width"] == 64
    resized = worker.execute("postprocessing.resize", {"output_id": output_id, "width": 48, "height": 16,
                                                       "background": False})
    assert (resized["outputs"][0]["width"], resized["outputs"][0]["height"]) == (48, 16)
    assert worker.execute("postprocessing.upscale", {"factor": 2})["error_code"] == "invalid_request"


def test_sdxl_family_runs_through_the_worker(worker):
    reply = worker.execute("inference.text2img", {"prompt": "x", "model": "builtin:tiny-sdxl", "steps": 3,
                                                  "seed": 2, "background": False})
    assert reply["status"] == "completed", reply


def test_inference_batch_process_is_execute_batch(worker):
    reply = worker.execute("inference.batch_process", {"workflow_id": "img-generation-basic", "background": False,
                                                       "parameters": {"steps": 3, "total_images": 2, "seed": 5}})
    assert reply["status"] == "completed" and [o["seed"] for o in reply["outputs"]] == [5, 6]


def test_a_model_that_fails_to_load_is_not_left_registered(make_worker, model_copy):
    weights = model_copy / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # configs fine, weights broken
    worker = make_worker(allowed_roots=[str(model_copy.parent)])
    reply = worker.execute("model.load", {"model_id": "half-loaded", "path": str(model_copy)})
    assert reply["success"] is False
    assert "half-loaded" not in [m["model_id"] for m in worker.execute("model.list", {})["models"]]
    refused = worker.execute_workflow(domains=[
        {"domain": "model", "operation": "load_model", "parameters": {"model_id": "named-then-refused",
                                                                      "path": str(model_copy)}},
        {"domain": "inference", "operation": "paint", "parameters": {}}])
    assert refused["error_code"] == "invalid_request"
    assert "named-then-refused" not in [m["model_id"] for m in worker.execute("model.list", {})["models"]]


def sources(worker) -> dict[str, str]:
    return {m["model_id"]: m["source"] for m in worker.execute("model.list", {})["models"]}


@pytest.mark.parametrize("model_id", ["builtin:tiny-sd", "builtin:shapes", "configured"])
def test_a_request_cannot_redefine_a_built_in_or_configured_model(make_worker, model_copy, model_id):
    """Every caller's sessions run on these ids: a request that names a folder for one is refused (as a
    direct load or as a coordination's step), and the id keeps its model."""
    worker = make_worker(allowed_roots=[str(model_copy.parent)], models={"configured": str(model_copy)})
    before = sources(worker)
    loaded = worker.execute("model.load_model", {"model_id": model_id, "path": str(model_copy)})
    assert loaded["error_code"] == "invalid_request" and f"'{model_id}'" in loaded["error"], loaded
    assert "cannot be redefined" in loaded["error"]
    stepped = worker.execute_workflow(domains=[
        {"domain": "model", "operation": "load_model", "parameters": {"model_id": model_id, "path": str(model_copy)}},
        {"domain": "inference", "operation": "text2img", "parameters": {"prompt": "x", "steps": 2}}])
    assert stepped["error_code"] == "invalid_request" and f"'{model_id}'" in stepped["error"], stepped
    assert sources(worker) == before


def test_a_model_id_a_request_named_keeps_its_folder(make_worker, model_copy):
    """Loading it again from the same folder is fine; naming another folder as it is refused: the pipeline
    a device worker holds for the id would otherwise answer for the new folder."""
    other = model_copy.parent / "other-sd"
    shutil.copytree(model_copy, other)
    worker = make_worker(allowed_roots=[str(model_copy.parent)])
    assert worker.execute("model.load", {"model_id": "mine", "path": str(model_copy)})["loaded"]
    assert worker.execute("model.load", {"model_id": "mine", "path": str(model_copy)})["loaded"]
    moved = worker.execute("model.load", {"model_id": "mine", "path": str(other)})
    assert moved["error_code"] == "invalid_request" and "'mine' already names" in moved["error"]
    assert sources(worker)["mine"] == str(model_copy)
    twice = worker.execute_workflow(domains=[
        {"domain": "model", "operation": "load_model", "parameters": {"model_id": "two", "path": str(model_copy)}},
        {"domain": "model", "operation": "load_model", "parameters": {"model_id": "two", "path": str(other)}}])
    assert twice["error_code"] == "invalid_request" and "two folders" in twice["error"]
    assert "two" not in sources(worker)


def test_a_request_refused_after_planning_registers_no_model(make_worker, model_copy):
    """An id collision is found after the plan is made: the model the request names stays unknown."""
    worker = make_worker(allowed_roots=[str(model_copy.parent)])
    batch = worker.execute_batch(batch_id="taken", workflow_id="img-generation-basic",
                                 parameters={"steps": 1, "total_images": 1})
    assert batch["success"], batch
    refused = worker.execute_workflow(session_id="taken", domains=[
        {"domain": "model", "operation": "load_model", "parameters": {"model_id": "collider",
                                                                      "path": str(model_copy)}},
        {"domain": "inference", "operation": "text2img", "parameters": {"prompt": "x", "steps": 2}}])
    assert refused["error_code"] == "invalid_request" and "already the id of" in refused["error"], refused
    assert "collider" not in sources(worker)


def test_the_image_limit_counts_images_through_every_step(make_worker):
    """text2img x4 then img2img x4 makes 16 images: more than max_items 4, refused before anything runs."""
    worker = make_worker(limits={"max_items": 4})
    reply = worker.execute_workflow(domains=[
        {"domain": "inference", "operation": "text2img", "parameters": {"prompt": "a", "num_images": 4}},
        {"domain": "inference", "operation": "img2img", "parameters": {"prompt": "b", "num_images": 4}}])
    assert reply["error_code"] == "invalid_request"
    assert reply["error"].startswith("domains.1.parameters.num_images: the request makes 16 images")
    parallel = worker.execute_workflow(coordination_mode="parallel", domains=[
        {"domain": "inference", "operation": "text2img", "parameters": {"prompt": "a", "num_images": 3}},
        {"domain": "inference", "operation": "text2img", "parameters": {"prompt": "b", "num_images": 2}}])
    assert parallel["error_code"] == "invalid_request" and "makes 5 images" in parallel["error"]
    within = worker.execute_workflow(background=False, domains=[
        {"domain": "inference", "operation": "text2img", "parameters": {"prompt": "a", "num_images": 2,
                                                                        "steps": 2}},
        {"domain": "inference", "operation": "img2img", "parameters": {"prompt": "b", "num_images": 2,
                                                                       "steps": 2}}])
    assert within["status"] == "completed" and len(within["outputs"]) == 4


def text2img(steps: int) -> dict:
    return {"domain": "inference", "operation": "text2img", "parameters": {"prompt": "a", "steps": steps}}


def test_a_coordination_is_bounded_in_operations_and_in_denoising_steps(make_worker):
    """max_steps bounds one operation; a coordination may list many, so their number and their summed
    denoising steps have limits of their own, refused before anything is accepted."""
    worker = make_worker()
    status = {"domain": "device", "operation": "get_status", "parameters": {}}
    many = worker.execute_workflow(domains=[status] * 20_000)
    assert many["error_code"] == "invalid_request" and "limits.max_operations (100)" in many["error"], many
    long = worker.execute_workflow(domains=[text2img(150)] * 21)  # 3,150 steps, each operation within max_steps
    assert long["error_code"] == "invalid_request" and "limits.max_denoising_steps (3000)" in long["error"]
    assert long["error"].startswith("domains.20.parameters.steps: the request runs 3150 denoising steps")
    tight = make_worker(limits={"max_operations": 2, "max_denoising_steps": 10})
    assert "max_operations" in tight.execute_workflow(domains=[status] * 3)["error"]
    assert "max_denoising_steps" in tight.execute_workflow(domains=[text2img(6), text2img(5)])["error"]
    assert worker.list_sessions()["total"] == tight.list_sessions()["total"] == 0


def test_a_coordinations_estimate_is_the_sum_of_its_steps(worker):
    """Before any step was measured (the device is held inside its first forward) the estimate is in
    proportion to the steps; once measured, more steps still estimate longer."""
    reached, release = threading.Event(), threading.Event()

    def hold(*_args) -> None:
        reached.set()
        release.wait(300)

    handle = pipeline_of(worker).unet.register_forward_hook(hold)
    try:
        first = worker.execute_workflow(domains=[text2img(1)])
        assert reached.wait(300)
        one = worker.execute_workflow(domains=[text2img(2)])
        three = worker.execute_workflow(domains=[text2img(2)] * 3)
        assert one["estimated_time"] > 0 and three["estimated_time"] == pytest.approx(3 * one["estimated_time"])
    finally:
        handle.remove()
        release.set()
    for session in (one, three):
        worker.control_session(session_id=session["session_id"], action="cancel")
    wait_for(lambda: worker.get_session_status(session_id=first["session_id"])["status"] == "completed")
    one = worker.execute_workflow(domains=[text2img(2)])
    three = worker.execute_workflow(domains=[text2img(2)] * 3)
    assert three["estimated_time"] > one["estimated_time"] > 0
