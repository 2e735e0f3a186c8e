"""inference.batch_process as the document writes it: batch_config.total_images is the image count,
generation_params are the parameters, and two counts that disagree are refused."""

from __future__ import annotations

import json

from embedded_worker import testing

BATCH_CONFIG = {"total_images": 5, "preferred_batch_size": 2, "max_batch_size": 4, "enable_dynamic_sizing": True,
                "memory_threshold": 0.8, "parallel_processing": False}


def finished(worker, batch_id: str) -> dict:
    testing.wait_until(worker,
        lambda: worker.get_batch_status(batch_id)["status"] in ("completed", "failed", "cancelled"), 120)
    return worker.get_batch_status({"batch_id": batch_id, "action": "get_status"})


def test_enhanced_batch_request_makes_total_images_items_with_seeds_seed_plus_i(worker):
    reply = worker.execute("inference.batch_process", {
        "batch_id": "doc-batch", "batch_config": BATCH_CONFIG,
        "generation_params": {"prompt": "a lighthouse", "seed": 20, "steps": 2}})
    assert reply["success"] and reply["batch_id"] == "doc-batch" and reply["total_items"] == 5, reply
    status = finished(worker, "doc-batch")
    assert (status["status"], status["total_items"], status["processed_items"], status["failed_items"]) == (
        "completed", 5, 5, 0)
    assert [o["seed"] for o in status["outputs"]] == [20, 21, 22, 23, 24]
    assert status["configuration"]["max_batch_size"] == 4 and status["metrics"]["total_images_generated"] == 5
    assert all(worker.get_output(o["output_id"]).shape == (32, 32, 3) for o in status["outputs"])


def test_distributed_form_as_json_text_is_answered_with_its_request_id(worker):
    message = {"type": "inference.batch_process", "request_id": "r-batch-1",
               "data": {"batch_config": {**BATCH_CONFIG, "total_images": 3},
                        "parameters": {"prompt": "a fox", "seed": 7, "steps": 2}}}
    reply = json.loads(worker.execute(json.dumps(message)))
    assert reply["success"] and reply["request_id"] == "r-batch-1", reply
    assert reply["data"]["total_items"] == 3
    status = finished(worker, reply["data"]["batch_id"])
    assert [o["seed"] for o in status["outputs"]] == [7, 8, 9]


def test_the_same_count_in_both_places_is_one_count(worker):
    reply = worker.execute("inference.batch_process", {
        "batch_id": "agreed", "batch_config": {"total_images": 2},
        "generation_params": {"prompt": "x", "seed": 1, "steps": 2, "total_images": 2}, "background": False})
    assert (reply["status"], reply["total_items"]) == ("completed", 2)


def test_two_counts_that_disagree_are_refused_naming_both_fields(worker):
    reply = worker.execute("inference.batch_process", {
        "batch_config": {"total_images": 5}, "generation_params": {"prompt": "x", "total_images": 3}})
    assert reply["error_code"] == "invalid_request"
    assert "batch_config.total_images (5) and generation_params.total_images (3) disagree" in reply["error"]
    distributed = json.loads(worker.execute(json.dumps({
        "type": "inference.batch_process", "request_id": "r-bad",
        "data": {"batch_config": {"total_images": 4}, "parameters": {"total_images": 2}}})))
    assert (distributed["success"], distributed["request_id"], distributed["error_code"]) == (
        False, "r-bad", "invalid_request")
    assert "batch_config.total_images" in distributed["error"] and "parameters.total_images" in distributed["error"]
    both_names = worker.execute_batch({"configuration": {"total_images": 2}, "batch_config": {"total_images": 3}})
    assert both_names["error_code"] == "invalid_request" and "batch_config" in both_names["error"]
    assert worker.execute("processing.get_status", {})["processing"]["batches"].get("pending", 0) == 0
