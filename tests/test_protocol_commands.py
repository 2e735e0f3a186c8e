"""Every protocol command through both ways in: typed methods and `execute`."""

from __future__ import annotations

import json

import numpy as np

from embedded_worker import testing

from .conftest import generate

WORKFLOW_FIELDS = {"id", "name", "description", "category", "version", "steps", "parameters", "required_models",
                   "estimated_duration", "is_available", "usage_count", "created_at", "updated_at"}
SESSION_FIELDS = {"session_id", "workflow_id", "status", "current_step", "total_steps", "progress",
                  "detailed_progress", "created_at", "started_at", "completed_at", "error", "outputs"}
BATCH_FIELDS = {"batch_id", "name", "status", "total_items", "processed_items", "failed_items", "current_batch_size",
                "completed_at", "outputs", "metrics"}
METRICS_FIELDS = {"total_batches", "completed_batches", "failed_batches", "total_images_generated",
                  "average_batch_time", "memory_usage_peak", "dynamic_adjustments"}


def plain(value) -> bool:
    """JSON-able plain Python only: what pythonnet converts without surprises."""
    if isinstance(value, dict):
        return all(isinstance(k, str) and plain(v) for k, v in value.items())
    if isinstance(value, list):
        return all(plain(v) for v in value)
    return value is None or type(value) in (str, int, float, bool)


def test_get_workflows_lists_the_builtins_with_every_protocol_field(worker):
    reply = worker.get_workflows({"action": "get_workflows"})
    assert reply["success"] and plain(reply)
    ids = {w["id"] for w in reply["workflows"]}
    assert {"img-generation-basic", "img2img-basic", "img-upscale-enhance"} <= ids
    for workflow in reply["workflows"]:
        assert WORKFLOW_FIELDS <= set(workflow)
        assert all({"order", "domain", "operation", "description"} <= set(s) for s in workflow["steps"])
        assert all({"name", "type", "default", "minimum", "maximum", "description"} <= set(p)
                   for p in workflow["parameters"])


def test_get_workflow_returns_one_and_counts_usage(worker):
    before = worker.get_workflow({"workflow_id": "img-generation-basic", "action": "get_workflow"})["workflow"]
    generate(worker)
    after = worker.get_workflow(workflow_id="img-generation-basic")["workflow"]
    assert after["usage_count"] == before["usage_count"] + 1 and after["is_available"]


def test_execute_workflow_background_then_status_until_completed(worker):
    reply = generate(worker, session_id="5b9c2f7e-0000-4000-8000-000000000001", background=True)
    assert reply["success"] and plain(reply)
    assert reply["session_id"] == "5b9c2f7e-0000-4000-8000-000000000001"
    assert reply["status"] in ("pending", "running", "completed")
    assert isinstance(reply["estimated_time"], float) and reply["workflow"]["id"] == "img-generation-basic"
    testing.wait_until(worker, lambda: worker.get_session_status(session_id=reply["session_id"])["status"]
                                   == "completed", 60)
    status = worker.get_session_status({"session_id": reply["session_id"], "action": "get_status"})
    assert SESSION_FIELDS <= set(status) and plain(status)
    assert (status["status"], status["progress"], status["current_step"]) == ("completed", 100, 2)
    assert status["completed_at"].endswith("Z") and status["detailed_progress"]["eta_seconds"] == 0.0
    [output] = status["outputs"]
    assert {"output_id", "item_id", "seed", "width", "height", "channels", "dtype"} <= set(output)
    assert (output["width"], output["height"], output["channels"], output["dtype"], output["seed"]) == (32, 32, 3, "uint8", 7)


def test_background_false_returns_the_final_status(worker):
    reply = generate(worker, background=False)
    assert reply["status"] == "completed" and reply["progress"] == 100 and len(reply["outputs"]) == 1


def test_same_session_id_twice_runs_once(worker):
    first = generate(worker, session_id="twice", background=False)
    second = generate(worker, session_id="twice", background=False, seed=99)
    assert second["duplicate"] and not first["duplicate"]
    assert second["outputs"] == first["outputs"]
    assert device_images_done(worker) == 1


def device_images_done(worker) -> int:
    return sum(w.counters.images_done for w in testing.device_workers(worker))


def test_control_session_verbs_any_case(worker):
    reply = generate(worker, session_id="ctl", background=True, steps=150)
    assert worker.control_session({"session_id": "ctl", "action": "PAUSE"})["status"] == "paused"
    assert worker.control_session({"session_id": "ctl", "action": "Resume", "parameters": None})["status"] in (
        "pending", "running")
    assert worker.control_session(session_id="ctl", action="cancel")["status"] == "cancelled"
    assert reply["success"]


def test_delete_session_cancels_running_work_and_frees_outputs(worker):
    done = generate(worker, session_id="done", background=False)
    output_id = done["outputs"][0]["output_id"]
    generate(worker, session_id="busy", background=True, steps=150)
    assert worker.delete_session({"session_id": "busy", "force_cleanup": True, "action": "delete_session"})["success"]
    assert worker.delete_session(session_id="done")["success"]
    assert worker.get_session_status(session_id="busy")["error_code"] == "not_found"
    assert worker.get_output(output_id)["error_code"] == "not_found"


def test_execute_batch_bare_form_the_csharp_client_sends(worker):
    reply = worker.execute_batch({"batch_id": "b-bare", "workflow_id": "img-generation-basic",
                                  "parameters": {"prompt": "a cat", "seed": 40, "steps": 4, "total_images": 3},
                                  "background": False, "action": "execute_batch"})
    assert reply["success"] and plain(reply)
    status = worker.get_batch_status({"batch_id": "b-bare", "action": "get_status"})
    assert BATCH_FIELDS <= set(status) and METRICS_FIELDS <= set(status["metrics"])
    assert (status["status"], status["total_items"], status["processed_items"], status["failed_items"]) == (
        "completed", 3, 3, 0)
    assert [o["seed"] for o in status["outputs"]] == [40, 41, 42]
    assert [o["item_id"] for o in status["outputs"]] == ["item-0000", "item-0001", "item-0002"]
    assert worker.delete_batch({"batch_id": "b-bare", "force_cleanup": True})["success"]
    assert worker.get_batch_status(batch_id="b-bare")["error"] == "Batch 'b-bare' not found"
    assert testing.held_for(worker, "b-bare") == []  # a deleted batch leaves no bookkeeping behind


def test_execute_accepts_prefixes_camel_case_and_json_strings(worker):
    as_dict = worker.execute("processing.get_workflows", {"action": "get_workflows"})
    assert as_dict["success"] and isinstance(as_dict, dict)
    as_json = worker.execute("GetWorkflows", json.dumps({"action": "get_workflows"}))
    assert isinstance(as_json, str) and json.loads(as_json)["workflows"] == as_dict["workflows"]
    assert worker.execute("device.get_status", {})["success"]
    assert worker.execute("model.list", {})["models"][0]["model_id"]
    assert worker.execute("inference.status", {})["success"]
    assert worker.execute("postprocessing.get_status", {})["operations"]


def test_distributed_form_is_answered_with_its_request_id(worker):
    message = {"type": "inference.text2img", "request_id": "r-17",
               "data": {"prompt": "a boat", "steps": 3, "seed": 1, "background": False}}
    reply = worker.execute(json.dumps(message))
    decoded = json.loads(reply)
    assert decoded["success"] and decoded["request_id"] == "r-17"
    assert decoded["data"]["status"] == "completed" and len(decoded["data"]["outputs"]) == 1
    failed = worker.execute("ignored", {"type": "processing.get_session_status", "request_id": "r-18",
                                         "data": {"session_id": "missing"}})
    assert (failed["success"], failed["request_id"], failed["error_code"]) == (False, "r-18", "not_found")


def test_get_status_aggregates_every_domain(worker):
    status = worker.get_status()
    assert status["success"] and plain(status)
    assert {"device", "model", "inference", "postprocessing", "processing"} <= set(status)


def test_list_sessions_and_output_info(worker):
    reply = generate(worker, session_id="listed", background=False)
    listed = worker.list_sessions()
    assert any(s["session_id"] == "listed" for s in listed["sessions"])
    info = worker.output_info(reply["outputs"][0]["output_id"])
    assert info["metadata"]["prompt"] == "a red fox in the snow" and info["owner_id"] == "listed"


def test_get_output_is_the_result_array_itself(worker):
    reply = generate(worker, background=False)
    output_id = reply["outputs"][0]["output_id"]
    pixels = worker.get_output(output_id)
    assert pixels is worker.get_output(output_id)  # the same object every time: no copies
    assert pixels.dtype == np.uint8 and pixels.shape == (32, 32, 3)
    assert pixels.flags["C_CONTIGUOUS"] and not pixels.flags["WRITEABLE"]
    assert memoryview(pixels).c_contiguous and memoryview(pixels).readonly


def test_close_then_every_call_is_unavailable(worker):
    assert worker.close(timeout=10) == {"success": True, "closed": True, "threads_stopped": True}
    assert worker.get_workflows()["error_code"] == "unavailable"
    assert json.loads(worker.execute("get_workflows", "{}"))["error_code"] == "unavailable"
