"""Every field a request names is acted on or refused: none is dropped without a word.

The refusals themselves (each misspelt field named with what is accepted there) are cases of
test_bad_input; here are the fields that must act, the spellings that must keep working, and the
configuration that ignores unknown fields but says so.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from pydantic.alias_generators import to_camel

from embedded_worker import testing

from .conftest import device_worker, generate

PARAMETERS = {"prompt": "a red fox in the snow", "seed": 7, "steps": 2}
NESTED = ("configuration", "batch_config", "items", "domains")  # parts the protocol describes field by field


def camel(request: dict) -> dict:
    """The request as a client serialising with .NET's camelCase policy sends it: the protocol's own fields
    renamed, workflow and operation parameters (names the workflow or operation defines) left as they are."""
    def rename(part: dict, depth: int) -> dict:
        renamed = {}
        for key, value in part.items():
            if key in NESTED and depth == 0:
                value = [rename(v, 1) if isinstance(v, dict) else v for v in value] if isinstance(value, list) \
                    else rename(value, 1)
            renamed[to_camel(key)] = value
        return renamed

    return rename(request, 0)


def snake(request: dict) -> dict:
    return request


def images_done(worker) -> int:
    return sum(w["images_done"] for w in worker.execute("inference.get_metrics", {})["workers"])


@pytest.mark.parametrize("spell", [snake, camel], ids=["as-documented", "camelCase"])
def test_every_documented_request_is_accepted_in_either_spelling(worker, spell):
    """The requests of the protocol's table, as the C# client sends them (with its `action`), and the
    richer ones it documents: each succeeds, and means the same in either spelling."""
    def call(command: str, request: dict) -> dict:
        reply = worker.execute(command, spell(request))
        assert reply["success"], (command, reply)
        return reply

    call("get_workflows", {"action": "get_workflows"})
    call("get_workflow", {"workflow_id": "img-generation-basic", "action": "get_workflow"})
    done = call("execute_workflow", {"session_id": "s1", "workflow_id": "img-generation-basic",
                                     "parameters": PARAMETERS, "priority": 7, "background": False,
                                     "action": "execute_workflow"})
    assert (done["session_id"], done["status"], done["priority"]) == ("s1", "completed", 7)
    assert call("get_session_status", {"session_id": "s1", "action": "get_status"})["status"] == "completed"
    for domain in ("model", "inference", "postprocessing", "device"):
        call(f"{domain}.get_status", {"session_id": "s1", "domains": ["model", "inference"]})
    call("get_status", {"session_id": "s1"})
    assert call("delete_session", {"session_id": "s1", "force_cleanup": True, "action": "delete_session"})["deleted"]

    gate = threading.Event()
    held = device_worker(worker).call(lambda w: gate.wait(120))  # nothing runs while the controls are sent
    try:
        call("execute_workflow", {"session_id": "s2", "workflow_id": "img-generation-basic", "parameters": None})
        for verb, status in (("cancel", "cancelled"), ("restart", "pending"), ("cancel", "cancelled")):
            reply = call("control_session", {"session_id": "s2", "action": verb, "parameters": None})
            assert reply["status"] == status, reply
    finally:
        gate.set()
        held.result(timeout=120)

    batch = call("execute_batch", {"batch_id": "b1", "workflow_id": "img-generation-basic",
                                   "parameters": {**PARAMETERS, "total_images": 2}, "background": False,
                                   "action": "execute_batch"})
    assert (batch["status"], batch["total_items"]) == ("completed", 2)
    status = call("get_batch_status", {"batch_id": "b1", "action": "get_status"})
    assert status["processed_items"] == 2 and "items" not in status
    assert len(call("get_batch_status", {"batch_id": "b1", "include_items": True})["items"]) == 2
    assert call("delete_batch", {"batch_id": "b1", "force_cleanup": True, "action": "delete_batch"})["deleted"]

    rich = call("execute_batch", {"batch_id": "b2", "workflow_id": "img-generation-basic", "name": "two",
                                  "parameters": {"steps": 2}, "priority": 6, "background": False,
                                  "items": [{"item_id": "fox", "parameters": {"prompt": "a fox", "seed": 1}},
                                            {"parameters": {"prompt": "a hen", "seed": 2}}],
                                  "configuration": {"preferred_batch_size": 2, "max_batch_size": 2,
                                                    "enable_dynamic_sizing": False}})
    assert (rich["status"], rich["name"], rich["priority"]) == ("completed", "two", 6)
    assert [o["item_id"] for o in rich["outputs"]] == ["fox", "item-0001"]
    assert rich["configuration"]["max_batch_size"] == 2

    inference = call("inference.batch_process", {"batch_id": "b3", "batch_config": {"total_images": 2},
                                                 "generation_params": PARAMETERS, "background": False})
    assert (inference["status"], inference["total_items"]) == ("completed", 2)
    distributed = worker.execute({"type": "inference.batch_process", "request_id": "r1",
                                  "data": spell({"batch_id": "b4", "batch_config": {"total_images": 2},
                                                 "parameters": PARAMETERS, "background": False})})
    assert distributed["success"] and distributed["data"]["total_items"] == 2, distributed

    coordinated = call("execute_workflow", {
        "coordination_id": "c1", "workflow_id": "sd-generate-enhance", "coordination_mode": "sequential",
        "background": False, "domains": [
            {"domain": "model", "operation": "load_model", "parameters": {"model_id": "builtin:tiny-sd"}},
            {"domain": "inference", "operation": "batch_process", "parameters": {
                "batch_id": "c1-batch", "batch_config": {"total_images": 2, "max_batch_size": 2},
                "generation_params": PARAMETERS}},
            {"domain": "postprocessing", "operation": "enhance", "parameters": {"sharpness": 1.5}}]})
    assert (coordinated["session_id"], coordinated["status"], len(coordinated["outputs"])) == ("c1", "completed", 2)


def test_a_camel_case_session_id_is_the_session_id_so_a_second_submit_does_not_run(worker):
    request = {"sessionId": "once", "workflowId": "img-generation-basic", "parameters": PARAMETERS,
               "background": False}
    first = worker.execute_workflow(request)
    assert (first["session_id"], first["status"], first["duplicate"]) == ("once", "completed", False)
    done = images_done(worker)
    second = worker.execute("execute_workflow", dict(request))
    assert (second["session_id"], second["duplicate"]) == ("once", True)
    assert images_done(worker) == done and worker.list_sessions()["total"] == 1


def test_batch_status_gives_items_when_asked_in_either_spelling_and_item_ids_are_kept(worker):
    reply = worker.execute_batch(batchId="b", workflowId="img-generation-basic", background=False,
                                 parameters={"steps": 2, "prompt": "x"},
                                 items=[{"itemId": "first", "parameters": {"seed": 1}},
                                        {"item_id": "second", "parameters": {"seed": 2}}])
    assert reply["status"] == "completed", reply
    assert "items" not in worker.get_batch_status(batch_id="b")
    for asked in ({"include_items": True}, {"includeItems": True}):
        items = worker.get_batch_status({"batch_id": "b", **asked})["items"]
        assert [(i["item_id"], i["seed"]) for i in items] == [("first", 1), ("second", 2)]


@pytest.mark.parametrize("kind", ["session", "batch"])
@pytest.mark.parametrize(("choice", "kept"), [({}, False), ({"force_cleanup": False}, True),
                                              ({"keep_files": True}, True), ({"keepFiles": True}, True),
                                              ({"force_cleanup": True, "keep_files": True}, True)])
def test_a_delete_keeps_the_image_files_when_asked(make_worker, tmp_path, kind, choice, kept):
    worker = make_worker(output_dir=str(tmp_path / "files"))
    if kind == "session":
        reply = generate(worker, session_id="w", steps=2)
        delete = worker.delete_session
    else:
        reply = worker.execute_batch(batch_id="w", workflow_id="img-generation-basic", background=False,
                                     parameters={**PARAMETERS, "total_images": 2})
        delete = worker.delete_batch
    files = [Path(output["path"]) for output in reply["outputs"]]
    assert files and all(f.is_file() for f in files), reply
    deleted = delete({f"{kind}_id": "w", **choice})
    assert deleted["success"] and deleted["released_outputs"] == len(files), deleted
    assert [f.is_file() for f in files] == [kept] * len(files)


def test_a_restart_with_parameters_is_refused_and_changes_nothing(worker):
    gate = threading.Event()
    held = device_worker(worker).call(lambda w: gate.wait(120))
    try:
        assert generate(worker, session_id="r", background=True, steps=2)["success"]
        assert worker.control_session(session_id="r", action="cancel")["status"] == "cancelled"
        refused = worker.control_session(session_id="r", action="restart", parameters={"seed": 99})
        assert refused["error_code"] == "invalid_request" and refused["error"].startswith("parameters: "), refused
        status = worker.get_session_status(session_id="r")
        assert (status["status"], status["attempt"]) == ("cancelled", 1)
        assert worker.control_session(session_id="r", action="restart", parameters={})["status"] == "pending"
    finally:
        gate.set()
        held.result(timeout=120)
    testing.wait_until(worker, lambda: worker.get_session_status(session_id="r")["status"] == "completed", 120)
    assert worker.get_session_status(session_id="r")["attempt"] == 2


def test_ignoring_unknown_fields_is_a_choice_and_never_silent(make_worker):
    """With `unknown_request_fields: ignore` a misspelt field is no refusal, but the reply lists every one
    (as the field is named in the request) and the log warns; the rest of the request runs as asked."""
    worker = make_worker(unknown_request_fields="ignore")
    worker.drain_logs()
    reply = worker.execute_workflow({"workflow_id": "img-generation-basic", "priorty": 9, "background": False,
                                     "parameters": {**PARAMETERS, "model_id": "builtin:shapes"}})
    assert reply["status"] == "completed" and reply["priority"] == 5, reply
    assert reply["ignored_parameters"] == ["priorty", "parameters.model_id"]
    assert worker.output_info(reply["outputs"][0]["output_id"])["metadata"]["model"] == "builtin:tiny-sd"

    batch = worker.execute("execute_batch", '{"workflow_id": "img-generation-basic", "background": false, '
                                            '"parameters": {"prompt": "x", "steps": 2, "total_image": 3}, '
                                            '"configuration": {"total_images": 2, "max_batchsize": 1}}')
    assert '"ignored_parameters": ["configuration.max_batchsize", "parameters.total_image"]' in batch
    assert '"total_items": 2' in batch and '"status": "completed"' in batch

    warnings = [r["message"] for r in worker.drain_logs()["records"] if r["level"] == "WARNING"]
    for field in ("priorty", "parameters.model_id", "configuration.max_batchsize", "parameters.total_image"):
        assert any(field in message and "ignored" in message for message in warnings), (field, warnings)
    clean = generate(worker, steps=2)
    assert clean["status"] == "completed" and "ignored_parameters" not in clean
    refused = worker.execute_workflow(workflow_id="img-generation-basic", parameters={"steps": "many"}, extra=1)
    assert refused["error_code"] == "invalid_request" and refused["ignored_parameters"] == ["extra"]
