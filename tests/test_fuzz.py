"""Fuzz: ten thousand generated requests through execute(); every reply a well-formed envelope."""

from __future__ import annotations

import json
import math

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from embedded_worker import ProcessingWorker, WorkerConfig

CODES = {"invalid_request", "not_found", "invalid_state", "resource_exhausted", "unavailable", "cancelled", "internal"}
COMMANDS = [
    "get_workflows", "get_workflow", "execute_workflow", "get_session_status", "control_session", "delete_session",
    "execute_batch", "get_batch_status", "delete_batch", "control_batch", "list_sessions", "get_status",
    "processing.execute_workflow", "inference.text2img", "inference.img2img", "inference.batch_process",
    "postprocessing.upscale", "postprocessing.encode", "model.list", "model.load", "device.get_status",
    "output_info", "release_input", "board_layout",
]
scalars = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=12)
json_like = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
    st.text(max_size=8), inner, max_size=4), max_leaves=12)
ids = st.one_of(st.text(max_size=12), st.none(), st.integers(), st.sampled_from(["s1", "b1", "out_x", "in_x", ""]))
parameters = st.dictionaries(
    st.sampled_from(["prompt", "seed", "steps", "width", "height", "num_images", "guidance_scale", "scheduler",
                     "strength", "init_image", "model", "total_images", "factor", "format"]),
    scalars | st.integers(-3, 70), max_size=6)
near_valid = st.fixed_dictionaries({}, optional={
    "session_id": ids, "batch_id": ids, "workflow_id": st.sampled_from(
        ["img-generation-basic", "img2img-basic", "img-upscale-enhance", "nope"]) | st.text(max_size=5),
    "parameters": parameters | json_like, "priority": st.integers(-3, 14) | scalars,
    "background": st.just(True) | scalars, "action": st.sampled_from(["pause", "RESUME", "cancel", "restart",
                                                                      "retry", "get_status"]) | st.text(max_size=6),
    "items": st.lists(st.fixed_dictionaries({"parameters": parameters}), max_size=3) | json_like,
    "configuration": st.dictionaries(st.sampled_from(["total_images", "min_batch_size", "max_batch_size",
                                                      "memory_threshold", "parallel_processing"]),
                                     scalars | st.integers(-2, 10), max_size=4),
    "domains": st.lists(st.fixed_dictionaries({"domain": st.sampled_from(["inference", "postprocessing", "x"]),
                                               "operation": st.sampled_from(["text2img", "upscale", "warp"]),
                                               "parameters": parameters}), max_size=3) | json_like,
    "coordination_mode": st.sampled_from(["sequential", "parallel", "both"]),
    "include_items": scalars, "force_cleanup": scalars, "model_id": ids, "output_id": ids,
})
distributed = st.fixed_dictionaries({"type": st.sampled_from(COMMANDS) | st.text(max_size=10),
                                     "request_id": ids, "data": near_valid | json_like})


def well_formed(reply) -> bool:
    def plain(value) -> bool:
        if isinstance(value, dict):
            return all(isinstance(k, str) and plain(v) for k, v in value.items())
        if isinstance(value, list):
            return all(plain(v) for v in value)
        if isinstance(value, float):
            return math.isfinite(value)
        return value is None or type(value) in (str, int, bool)

    if not isinstance(reply, dict) or not isinstance(reply.get("success"), bool) or not plain(reply):
        return False
    if reply["success"]:
        return True
    return isinstance(reply.get("error"), str) and bool(reply["error"]) and reply.get("error_code") in CODES


def test_ten_thousand_generated_requests_get_well_formed_envelopes(model_cache):
    config = WorkerConfig(model_cache_dir=model_cache, state_path=":memory:",
                          limits={"max_image_side": 64, "max_steps": 3, "max_items": 2, "max_queued_work": 40},
                          scheduling={"coalesce_wait_ms": 0})
    with ProcessingWorker(config) as worker:
        seen = {"examples": 0, "succeeded": 0}

        @settings(max_examples=10_000, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(command=st.sampled_from(COMMANDS) | st.text(max_size=16) | scalars,
               request=near_valid | json_like | distributed, as_json=st.booleans())
        def one_request(command, request, as_json):
            if as_json:
                request = json.dumps(request)
            reply = worker.execute(command, request)
            json_in = isinstance(request, str) or (
                request is None and isinstance(command, str) and command.lstrip().startswith("{"))
            assert isinstance(reply, str) == json_in, (command, request, reply)  # JSON in, JSON out
            if json_in:
                reply = json.loads(reply)
            assert well_formed(reply), (command, request, reply)
            seen["examples"] += 1
            seen["succeeded"] += reply["success"]

        one_request()
        # valid ones got through too (fewer since unknown fields are refused: a generated dict mixes every
        # command's keys)
        assert seen["examples"] >= 10_000 and seen["succeeded"] > 50
        healthy = worker.execute_workflow(workflow_id="img-generation-basic", background=False, priority=10,
                                          parameters={"prompt": "still here", "steps": 3, "seed": 1})
        assert healthy["status"] == "completed", healthy
