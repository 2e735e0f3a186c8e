"""Bad input never raises and never stops accepted work: an envelope with a code and the field."""

from __future__ import annotations

import json

import pytest

from embedded_worker import testing

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
    # ids are stored and logged: control characters are refused at the door, naming the field
    ("execute_workflow", {"session_id": "a\x00b", "workflow_id": "img-generation-basic"}, "invalid_request",
     "session_id: must not contain control characters"),
    ("execute_batch", {"batch_id": "x\ny", "workflow_id": "img-generation-basic"}, "invalid_request",
     "batch_id: must not contain control characters"),
    # what the protocol says is an integer or a boolean is exactly that
    ("execute_workflow", {"workflow_id": "img-generation-basic", "parameters": {"steps": True}}, "invalid_request",
     "parameters.steps"),
    ("execute_workflow", {"workflow_id": "img-generation-basic", "parameters": {"seed": True}}, "invalid_request",
     "parameters.seed"),
    ("execute_workflow", {"workflow_id": "img-generation-basic", "priority": True}, "invalid_request", "priority"),
    ("execute_workflow", {"workflow_id": "img-generation-basic", "background": "yes"}, "invalid_request",
     "background"),
    ("execute_batch", {"workflow_id": "img-generation-basic", "configuration": {"max_batch_size": True}},
     "invalid_request", "configuration.max_batch_size"),
    # a count that is no count is refused, never run as one item
    ("execute_batch", {"workflow_id": "img-generation-basic", "parameters": {"total_images": 0}},
     "invalid_request", "total_images"),
    ("execute_batch", {"workflow_id": "img-generation-basic", "parameters": {"total_images": -1}},
     "invalid_request", "total_images"),
    ("execute_batch", {"workflow_id": "img-generation-basic", "parameters": {"total_images": "abc"}},
     "invalid_request", "total_images"),
    ("execute_batch", {"workflow_id": "img-generation-basic", "parameters": {"total_images": 2.5}},
     "invalid_request", "total_images"),
    # seeds are stored as signed 64-bit integers: seed + i must fit
    ("execute_workflow", {"workflow_id": "img-generation-basic",
                          "parameters": {"seed": 2**63 - 1, "num_images": 2}}, "invalid_request",
     "seed + num_images - 1 must not exceed"),
    ("execute_batch", {"workflow_id": "img-generation-basic", "parameters": {"seed": 2**63 - 1, "total_images": 2}},
     "invalid_request", "seed"),
    ("execute_workflow", {"session_id": "e" * 201, "workflow_id": "img-generation-basic"}, "invalid_request",
     "session_id"),
    # a field no model takes is refused, naming it: dropped, it would run what nobody asked for
    ("execute_workflow", {"workflow_id": "img-generation-basic", "priorty": 9}, "invalid_request",
     "priorty: unknown field (accepted here: action, session_id, workflow_id, parameters, priority, background"),
    ("execute_workflow", {"workflow_id": "img-generation-basic", "backgroud": False}, "invalid_request",
     "backgroud: unknown field"),
    ("execute_workflow", {"workflow_id": "img-generation-basic", "parameters": {"model_id": "builtin:tiny-sd"}},
     "invalid_request", "parameters.model_id: unknown field (accepted here: prompt, negative_prompt, seed"),
    ("execute_workflow", {"workflow_id": "img-upscale-enhance", "parameters": {"scheduler": "ddim"}},
     "invalid_request", "parameters.scheduler: unknown field"),
    ("execute_workflow", {"session_id": "s", "sessionId": "t", "workflow_id": "img-generation-basic"},
     "invalid_request", "sessionId and session_id: two spellings of one field"),
    ("execute_workflow", {"domains": [{"domain": "inference", "operation": "text2img",
                                       "parameters": {"prompt": "x", "model_id": "builtin:tiny-sd"}}]},
     "invalid_request", "domains.0.parameters.model_id: unknown field"),
    ("execute_workflow", {"domains": [{"domain": "inference", "operation": "text2img", "params": {"prompt": "x"}}]},
     "invalid_request", "domains.0.params: unknown field (accepted here: domain, operation, parameters)"),
    ("control_session", {"session_id": "x", "action": "restart", "parameters": {"seed": 3}}, "invalid_request",
     "parameters: no control takes parameters, got seed"),
    ("delete_session", {"session_id": "x", "keepFiles": True, "keep_files": False}, "invalid_request",
     "keepFiles and keep_files: two spellings"),
    ("delete_session", {"session_id": "x", "keep_file": True}, "invalid_request", "keep_file: unknown field"),
    ("execute_batch", {"workflow_id": "img-generation-basic", "parameters": {"total_image": 3}}, "invalid_request",
     "parameters.total_image: unknown field (accepted here: prompt"),
    ("execute_batch", {"workflow_id": "img-generation-basic", "configuration": {"max_batchsize": 2}},
     "invalid_request", "configuration.max_batchsize: unknown field (accepted here: total_images"),
    ("execute_batch", {"workflow_id": "img-generation-basic", "items": [{"item_id": "a", "params": {"seed": 1}}]},
     "invalid_request", "items.0.params: unknown field (accepted here: item_id, parameters)"),
    ("get_batch_status", {"batch_id": "x", "include_item": True}, "invalid_request", "include_item: unknown field"),
    ("delete_batch", {"batch_id": "x", "force_clean": True}, "invalid_request", "force_clean: unknown field"),
    ("get_workflows", {"category": "x"}, "invalid_request", "category: unknown field (accepted here: action)"),
    ("inference.text2img", {"prompt": "x", "model_id": "builtin:tiny-sd"}, "invalid_request",
     "parameters.model_id: unknown field"),
    ("inference.batch_process", {"batch_config": {"total_images": 2, "max_batchsize": 2}}, "invalid_request",
     "batch_config.max_batchsize: unknown field"),
    ("model.load_model", {"model_id": "builtin:tiny-sd", "folder": "/tmp"}, "invalid_request",
     "folder: unknown field (accepted here: model_id, model, model_name, path, action)"),
    ("device.list_devices", {"verbose": True}, "invalid_request", "verbose: unknown field"),
    ("get_status", {"session_id": "x", "domain": "model"}, "invalid_request", "domain: unknown field"),
]


@pytest.mark.parametrize(("command", "request_data", "code", "message"), CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_bad_requests_get_the_right_code_and_name_the_field(worker, command, request_data, code, message):
    typed = worker.execute(command, request_data) if "." in command else getattr(worker, command)(request_data)
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
        assert worker.execute(command, request_data)["success"] is False
    testing.wait_until(worker, lambda: session_status(worker, "keeps-going")["status"] == "completed", 60)
    assert session_status(worker, "keeps-going")["outputs"]


def nested(depth: int) -> list:
    value: list = []
    for _ in range(depth):
        value = [value]
    return value


def test_deep_nesting_is_refused_at_the_door(worker):
    """3,000 nested lists overflow the interpreter's stack in json and in pydantic: refused before either."""
    as_dict = {"workflow_id": "img-generation-basic", "parameters": {"prompt": "x", "deep": nested(3000)}}
    as_text = '{"workflow_id": "img-generation-basic", "parameters": {"deep": ' + "[" * 3000 + "]" * 3000 + "}}"
    replies = [worker.execute_workflow(as_dict), worker.execute("execute_workflow", as_dict),
               json.loads(worker.execute("execute_workflow", as_text)), worker.execute_workflow(as_text)]
    for reply in replies:
        assert reply["success"] is False and reply["error_code"] == "invalid_request", reply
        assert "nested deeper than 32 levels" in reply["error"]


def test_requests_too_large_to_keep_are_refused(worker):
    reply = worker.execute_workflow(workflow_id="img-generation-basic", parameters={"prompt": "x" * 5_000_000})
    assert reply["error_code"] == "invalid_request" and "larger than" in reply["error"]


@pytest.mark.parametrize("token", ["NaN", "Infinity", "-Infinity"])
def test_numbers_json_cannot_carry_are_refused_and_never_emitted(worker, token):
    text = '{"workflow_id": "img-generation-basic", "parameters": {"guidance_scale": %s}}' % token
    reply = worker.execute("execute_workflow", text)
    assert json.loads(reply)["error_code"] == "invalid_request" and token in json.loads(reply)["error"]
    reply = worker.execute_workflow(workflow_id="img-generation-basic",
                                    parameters={"guidance_scale": float(token.lower().replace("infinity", "inf"))})
    assert reply["error_code"] == "invalid_request" and "parameters.guidance_scale" in reply["error"]


def test_null_priority_is_the_default_and_null_data_is_an_empty_request(worker):
    reply = worker.execute_workflow(session_id="default-priority", workflow_id="img-generation-basic", priority=None,
                                    parameters={"prompt": "a red fox in the snow", "steps": 2}, background=False)
    assert reply["success"] and reply["status"] == "completed" and reply["priority"] == 5
    reply = worker.execute({"type": "device.get_status", "request_id": "r1", "data": None})
    assert reply["success"] and reply["request_id"] == "r1"


def test_an_id_that_looks_like_json_can_be_polled_by_bare_id(worker):
    reply = generate(worker, session_id="{3F2504E0-4F89-11D3-9A0C-0305E82C3301}", background=False)
    assert reply["success"]
    status = worker.get_session_status("{3F2504E0-4F89-11D3-9A0C-0305E82C3301}")
    assert status["success"] and status["status"] == "completed"
    assert worker.delete_session("{3F2504E0-4F89-11D3-9A0C-0305E82C3301}")["success"]


def test_get_output_names_its_field_and_takes_json_text(worker):
    reply = worker.get_output(5)
    assert reply["error_code"] == "invalid_request" and reply["error"].startswith("output_id")
    output_id = generate(worker, background=False)["outputs"][0]["output_id"]
    pixels = worker.get_output(json.dumps({"output_id": output_id}))
    assert pixels is worker.get_output(output_id)


@pytest.mark.parametrize("channels", [True, 2, "3", None])
def test_allocate_input_refuses_what_is_not_a_channel_count(worker, channels):
    reply = worker.allocate_input(8, 8, channels)
    assert reply["success"] is False and reply["error_code"] == "invalid_request" and "channels" in reply["error"]


def test_the_queue_limit_holds_under_concurrent_submits(make_worker):
    """Sixteen threads submit five sessions each against a limit of twenty while the device is held
    between two steps, so nothing finishes meanwhile: exactly twenty are accepted."""
    import threading

    from .conftest import device_worker

    worker = make_worker(limits={"max_queued_work": 20})
    gate = threading.Event()
    held = device_worker(worker).call(lambda w: gate.wait(60))
    replies: list[dict] = []
    lock = threading.Lock()

    def submit() -> None:
        for _ in range(5):
            reply = generate(worker, background=True, steps=2)
            with lock:
                replies.append(reply)

    threads = [threading.Thread(target=submit) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    gate.set()
    held.result(timeout=60)
    accepted = [r for r in replies if r["success"]]
    refused = [r for r in replies if not r["success"]]
    assert len(accepted) == 20 and len(refused) == 60
    assert {r["error_code"] for r in refused} == {"resource_exhausted"}


def test_log_records_keep_nothing_alive_and_stay_bounded():
    """A record is turned into a small dict when it is emitted: a request it names can be collected at
    once, and its text is cut at MAX_MESSAGE_CHARS."""
    import gc
    import logging
    import weakref

    from embedded_worker.log_bridge import MAX_MESSAGE_CHARS, LogBridge

    class Request(dict):
        pass

    bridge = LogBridge(capacity=10)
    logger = logging.getLogger("embedded_worker.test_log_bridge")
    logger.propagate = False  # pytest's own capture would keep the record, and the request with it
    logger.addHandler(bridge)
    try:
        request = Request(prompt="x" * 1_000_000)
        kept = weakref.ref(request)

        def fail(held: Request) -> None:
            raise ValueError("bad")

        try:
            fail(request)
        except ValueError:
            logger.exception("failed on %s", request)
        del request
        gc.collect()
        assert kept() is None, "the request is still alive"  # neither the argument nor a traceback frame
        [record], dropped = bridge.drain(10)
        assert dropped == 0 and len(record["message"]) < MAX_MESSAGE_CHARS + 100
        assert "characters cut" in record["message"]
    finally:
        logger.removeHandler(bridge)
