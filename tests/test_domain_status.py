"""Status aggregation as the C# side does it: each domain's get_status with a session_id or batch_id
answers that work's part; without one, the domain's generic status; an unknown id is not found."""

from __future__ import annotations

import json

from embedded_worker import testing

from .conftest import device_worker
from .test_batches import FakeMemoryProbe, simulate_device_memory

UPSCALED = [{"domain": "inference", "operation": "text2img", "parameters": {"prompt": "a kite", "seed": 3, "steps": 150}},
            {"domain": "postprocessing", "operation": "upscale", "parameters": {"factor": 2}}]


def test_a_paused_session_reports_its_part_in_every_domain(worker):
    assert worker.execute("model.load_model", {"model_id": "builtin:tiny-sd"})["loaded"]  # not the warm-up's load
    worker.execute_workflow(coordination_id="status-me", domains=UPSCALED)
    testing.wait_until(worker, lambda: worker.get_session_status("status-me")["status"] == "running", 60)
    assert worker.control_session(session_id="status-me", action="pause")["status"] == "paused"
    request = {"session_id": "status-me", "domains": ["model", "inference", "postprocessing", "device"]}

    model = worker.execute("model.get_status", request)
    assert (model["domain"], model["session_id"], model["status"]) == ("model", "status-me", "paused")
    [used] = model["models"]
    assert (used["model_id"], used["state"], used["operations"]) == ("builtin:tiny-sd", "loaded", ["inference.text2img"])
    assert used["loaded_on"] == [device_worker(worker).name]

    inference = json.loads(worker.execute("inference.get_status", json.dumps(request)))
    [image] = inference["images"]
    assert (image["seed"], image["state"], image["worker"]) == (3, "parked", device_worker(worker).name)
    assert 0 <= image["step"] < image["total_steps"] and image["total_steps"] >= 150  # step k of n
    assert inference["counts"]["parked"] == 1 and inference["eta_seconds"] is None  # paused: no ETA

    post = worker.execute("postprocessing.get_status", request)
    assert [(s["order"], s["operation"], s["status"]) for s in post["steps"]] == [(2, "upscale", "waiting")]

    device = worker.execute("device.get_status", request)
    [where] = device["workers"]
    assert (where["worker"], where["device"], where["images_parked"]) == (device_worker(worker).name, "cpu", 1)
    assert device["memory"]["cpu"]["total_bytes"] > 0

    aggregated = worker.get_status(request)
    assert set(aggregated["domains"]) == {"model", "inference", "postprocessing", "device"}
    assert aggregated["domains"]["inference"]["images"][0]["state"] == "parked"
    worker.control_session(session_id="status-me", action="cancel")


def test_a_finished_session_and_a_batch_report_what_was_done(worker):
    done = worker.execute_workflow(coordination_id="done", background=False, domains=[
        {**UPSCALED[0], "parameters": {"prompt": "a kite", "seed": 3, "steps": 2}}, UPSCALED[1]])
    assert done["status"] == "completed"
    post = worker.execute("postprocessing.get_status", {"session_id": "done"})
    assert [(s["operation"], s["status"], s["completed"]) for s in post["steps"]] == [("upscale", "completed", 1)]
    assert worker.execute("inference.status", {"session_id": "done"})["counts"]["done"] == 1

    worker.execute_batch(batch_id="b-status", background=False, parameters={"seed": 5, "steps": 2, "total_images": 3})
    inference = worker.execute("inference.get_status", {"batch_id": "b-status", "domains": ["inference"]})
    assert inference["batch_id"] == "b-status" and inference["status"] == "completed"
    assert sorted(i["seed"] for i in inference["images"]) == [5, 6, 7] and inference["counts"]["done"] == 3
    aggregated = worker.execute("get_status", {"batch_id": "b-status", "domains": ["model", "processing"]})
    assert aggregated["domains"]["processing"]["processed_items"] == 3
    assert aggregated["domains"]["model"]["models"][0]["model_id"] == "builtin:tiny-sd"


def test_without_an_id_the_generic_status_and_an_unknown_id_is_not_found(worker):
    assert "workers" in worker.execute("device.get_status", {"domains": ["device"]})
    assert "operations" in worker.execute("inference.get_status", {})
    assert {"device", "model", "inference", "postprocessing", "processing"} <= set(worker.get_status({}))
    missing = worker.execute("model.get_status", {"session_id": "nope", "domains": ["model"]})
    assert (missing["success"], missing["error_code"], missing["error"]) == (False, "not_found",
                                                                           "Session 'nope' not found")
    assert worker.get_status({"batch_id": "nope"})["error"] == "Batch 'nope' not found"


def test_recommend_batch_size_says_what_the_memory_monitor_would_pick_and_why(make_worker):
    worker = make_worker(scheduling={"max_batch_size": 8})
    before = worker.execute("inference.recommend_batch_size", {"model": "builtin:tiny-sd", "width": 32, "height": 32,
                                                               "guidance_scale": 7.5})
    assert (before["batch_size"], before["devices"]["cpu"]["reason"]) == (8, "configured"), before
    assert "not measured yet" in before["devices"]["cpu"]["why"]

    hook, _ = simulate_device_memory(worker, FakeMemoryProbe(total=1000, base=100, per_image=200),
                                     out_of_memory_above=8)
    try:
        worker.execute_batch(background=False, parameters={"seed": 1, "steps": 2, "total_images": 2})
    finally:
        hook.remove()
    after = json.loads(worker.execute("inference.recommend_batch_size", json.dumps(
        {"model": "builtin:tiny-sd", "width": 32, "height": 32, "guidance": True, "memory_threshold": 0.8})))
    cpu = after["devices"]["cpu"]
    assert (after["batch_size"], cpu["reason"], cpu["bytes_per_image"]) == (3, "memory", 200)  # (800-100)/200
    assert "3 images" in cpu["why"]
    other = worker.execute("inference.recommend_batch_size", {"guidance_scale": 1.0})  # another forward kind
    assert other["guidance"] is False and other["devices"]["cpu"]["reason"] == "configured"


def test_get_metrics_gives_the_batch_managers_figures_across_batches(worker):
    worker.execute_batch(batch_id="m1", background=False, parameters={"seed": 1, "steps": 2, "total_images": 2})
    worker.execute_batch(batch_id="m2", background=False, parameters={"seed": 9, "steps": 2, "total_images": 3})
    reply = worker.execute("inference.get_metrics", {})
    metrics = reply["metrics"]
    assert (metrics["batches"], metrics["batches_by_status"], metrics["total_images_generated"]) == (
        2, {"completed": 2}, 5)
    assert metrics["completed_batches"] >= 2 and metrics["average_batch_time"] > 0
    assert reply["workers"][0]["images_done"] >= 5
    one = worker.execute("inference.get_metrics", {"batch_id": "m2"})["metrics"]
    assert (one["batch_id"], one["total_images_generated"]) == ("m2", 3)
    assert worker.execute("inference.get_metrics", {"batch_id": "nope"})["error_code"] == "not_found"
