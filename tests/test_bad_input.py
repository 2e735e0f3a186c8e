"""Bad input never raises and never stops accepted work: an envelope with a code and the field."""

from __future__ import annotations

import json

import pytest

from .conftest import generate, session_status

CASES = [
    ("execute_workflow", {"workflow_id": "nope"}, "not_found", "Workflow 'nope' not found"),
    ("execute_workflow", {}, "invalid_request", "workflow_id: required"),
    ("execute_workflow", {"workflow_id": "img-generation-basic", "priority": 0}, "invalid_request", "priority"),
    ("execute_workflow", {"workflow_id": "img-generation-basic", "priority": "high"}, "invalid_request", "priority"),
    ("execute_workflow", {"workflow_id": "img-generation-basic", "background": "maybe"}, "invalid_request", "background"),
    ("execute_workflow", {"workflow_id": "img-generation-basic", "parameters": "x"}, "invalid_request", "parameters"),
    ("execute_workflow", {"workflow_id": "img-generation-basic", "parameters": {"steps": 151}}, "invalid_request",
     "parameters.steps"),
    ("execute_workflow", {"workflow_id": "img-generation-basic", "parameters": {"steps": "many"}}, "invalid_request",
     "parameters.steps"),
    ("execute_workflow", {"workflow_id": "img-generation-basic", "parameters": {"width": 4096}}, "invalid_request",
     "parameters.width"),
    ("execute_workflow", {"workflow_id": "img-generation-basic", "parameters": {"width": 100}}, "invalid_request",
     "parameters.width: 100 is not a multiple of 8"),
    ("execute_workflow", {"workflow_id": "img-generation-basic", "parameters": {"scheduler": "warp"}},
     "invalid_request", "parameters.scheduler"),
    ("execute_workflow", {"workflow_id": "img-generation-basic", "parameters": {"model": "sd-9"}},
     "invalid_request", "parameters.model: unknown model 'sd-9'"),
    ("execute_workflow", {"workflow_id": "img2img-basic", "parameters": {}}, "invalid_request",
     "parameters.init_image"),
    ("execute_workflow", {"workflow_id": "img2img-basic", "parameters": {"init_image": "out_missing"}},
     "invalid_request", "Output 'out_missing' not found"),
    ("execute_workflow", {"workflow_id": "img2img-basic", "parameters": {"init_image": "/etc/passwd"}},
     "invalid_request", "no allowed_roots"),
    ("execute_workflow", {"domains": []}, "invalid_request", "domains"),
    ("execute_workflow", {"domains": [{"domain": "inference", "operation": "paint", "parameters": {}}]},
     "invalid_request", "domains.0.operation: unknown operation 'inference.paint'"),
    ("execute_workflow", {"domains": [{"domain": "gpu", "operation": "x"}]}, "invalid_request", "domains.0.domain"),
    ("execute_workflow", {"session_id": "", "workflow_id": "img-generation-basic"}, "invalid_request", "session_id"),
    ("get_session_status", {}, "invalid_request", "session_id: Field required"),
    ("get_session_status", {"session_id": None}, "invalid_request", "session_id"),
    ("get_session_status", {"session_id": "ghost"}, "not_found", "Session 'ghost' not found"),
    ("control_session", {"session_id": "ghost", "action": "pause"}, "not_found", "Session 'ghost' not found"),
    ("control_session", {"session_id": "x", "action": "explode"}, "invalid_request", "action: must be one of"),
    ("delete_session", {"session_id": "ghost"}, "not_found", "Session 'ghost' not found"),
    ("get_batch_status", {"batch_id": "ghost"}, "not_found", "Batch 'ghost' not found"),
    ("delete_batch", {"batch_id": "ghost"}, "not_found", "Batch 'ghost' not found"),
    ("execute_batch", {"workflow_id": "nope"}, "not_found", "Workflow 'nope' not found"),
    ("execute_batch", {"workflow_id": "img-generation-basic", "parameters": {"total_images": 100000}},
     "invalid_request", "parameters.total_images: 100000 items exceed the limit"),
    ("execute_batch", {"workflow_id": "img-generation-basic", "items": []}, "invalid_request", "items"),
    ("execute_batch", {"workflow_id": "img-generation-basic", "items": [{"parameters": {"steps": -1}}]},
     "invalid_request", "items.0.parameters.steps"),
    ("execute_batch", {"workflow_id": "img-generation-basic", "configuration": {"min_batch_size": 9,
                                                                               "max_batch_size": 2}},
     "invalid_request", "min_batch_size"),
    ("get_workflow", {"workflow_id": "nope"}, "not_found", "Workflow 'nope' not found"),
    ("get_workflow", {}, "invalid_request", "workflow_id"),
]


@pytest.mark.parametrize(("command", "request_data", "code", "message"), CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_bad_requests_get_the_right_code_and_name_the_field(worker, command, request_data, code, message):
    typed = getattr(worker, command)(request_data)
    through_execute = json.loads(worker.execute(command, json.dumps(request_data)))
    for reply in (typed, through_execute):
        assert reply["success"] is False
        assert reply["error_code"] == code
        assert message in reply["error"]


@pytest.mark.parametrize("raw", ["", "{", "[1, 2]", "null", "42", '"text"', "{\"a\": NaN"])
def test_malformed_json_is_an_envelope_in_json(worker, raw):
    reply = json.loads(worker.execute("execute_workflow", raw))
    assert reply["success"] is False and reply["error_code"] == "invalid_request"


@pytest.mark.parametrize("command", [None, "", "   ", "nothing", "device.explode", "warp.drive", 42])
def test_unknown_commands_are_refused_with_what_is_known(worker, command):
    reply = worker.execute(command, {})
    assert reply["success"] is False and reply["error_code"] == "invalid_request"


@pytest.mark.parametrize("request_data", [42, [1], object(), b"bytes"])
def test_requests_of_the_wrong_type_are_refused(worker, request_data):
    assert worker.execute_workflow(request_data)["error_code"] == "invalid_request"
    assert worker.execute("get_session_status", request_data)["error_code"] == "invalid_request"


def test_illegal_controls_say_the_current_status(worker):
    generate(worker, session_id="finished", background=False)
    for verb in ("pause", "resume", "cancel", "restart"):
        reply = worker.control_session(session_id="finished", action=verb)
        assert reply["error_code"] == "invalid_state"
        assert reply["error"] == f"Session 'finished' cannot {verb} in current status: completed"


def test_the_queue_limit_refuses_with_resource_exhausted(make_worker):
    worker = make_worker(limits={"max_queued_work": 2})
    assert generate(worker, background=True, steps=150)["success"]
    assert generate(worker, background=True, steps=150)["success"]
    reply = generate(worker, background=True)
    assert reply["error_code"] == "resource_exhausted" and "queue is full" in reply["error"]
    batch = worker.execute_batch(workflow_id="img-generation-basic", parameters={"total_images": 2})
    assert batch["error_code"] == "resource_exhausted"


def test_accepted_work_keeps_running_through_a_storm_of_bad_requests(worker):
    accepted = generate(worker, session_id="keeps-going", background=True, steps=20)
    assert accepted["success"]
    for command, request_data, _, _ in CASES * 3:
        assert getattr(worker, command)(request_data)["success"] is False
    worker._engine.book.wait_until(lambda: session_status(worker, "keeps-going")["status"] == "completed", 60)
    assert session_status(worker, "keeps-going")["outputs"]
