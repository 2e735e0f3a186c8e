"""Batches at full strength: memory-aware sizing, OOM recovery, control, retry, nothing lost."""

from __future__ import annotations

import shutil
import threading

import numpy as np
import pytest
import torch

from embedded_worker import testing
from embedded_worker.diffusion.families import adapter_for
from embedded_worker.diffusion.memory import MemoryReading
from embedded_worker.diffusion.tiny_model import ensure_tiny_model

from .conftest import assert_same_up_to_batch_rounding, device_worker, generate, pipeline_of, wait_for


class FakeMemoryProbe:
    """A fake for what cannot happen on this CPU: device memory that fills as images join a forward.

    Between forwards `base` bytes are used; a forward of n images peaks at
    base + n x per_image. A denoiser pre-hook tells it n.
    """

    def __init__(self, total: int, base: int, per_image: int):
        self.total, self.base, self.per_image = total, base, per_image
        self.images = 0

    def read(self) -> MemoryReading:
        return MemoryReading(self.base, self.total)

    def reset_peak(self) -> None:
        self.images = 0

    def peak_used(self) -> int:
        return self.base + self.per_image * self.images


def simulate_device_memory(worker, probe: FakeMemoryProbe, out_of_memory_above: int,
                           model_id: str = "builtin:tiny-sd", rows_per_image: int = 2):
    """Install the fake probe and a fake out-of-memory error for forwards of more than N images, on the
    denoiser (UNet or transformer) of `model_id`; `rows_per_image`: 2 where classifier-free guidance
    doubles the rows, 1 where the family has none (Flux)."""
    device = device_worker(worker)
    device.monitor.probe = probe
    pipe = pipeline_of(worker, model_id)
    seen: list[int] = []

    def before_forward(module, args, kwargs):
        sample = args[0] if args else kwargs["hidden_states"]  # transformers are called by keyword
        images = sample.shape[0] // rows_per_image
        seen.append(images)
        if images > out_of_memory_above:
            raise torch.OutOfMemoryError(f"fake: {images} images do not fit")  # what a full GPU raises
        probe.images = max(probe.images, images)

    return adapter_for(pipe).denoiser(pipe).register_forward_pre_hook(before_forward, with_kwargs=True), seen


def outputs_by_seed(worker, reply) -> dict[int, np.ndarray]:
    return {o["seed"]: worker.get_output(o["output_id"]) for o in reply["outputs"]}


def test_fifty_items_survive_memory_pressure_and_injected_oom_exactly_once(make_worker):
    worker = make_worker(scheduling={"max_batch_size": 8, "coalesce_wait_ms": 50})
    hook, seen = simulate_device_memory(worker, FakeMemoryProbe(total=1000, base=100, per_image=200),
                                        out_of_memory_above=3)
    try:
        reply = worker.execute_batch(
            batch_id="pressure", workflow_id="img-generation-basic", background=False,
            parameters={"prompt": "a pressure test", "seed": 1000, "steps": 4, "total_images": 50},
            configuration={"total_images": 50, "max_batch_size": 8, "min_batch_size": 1,
                           "enable_dynamic_sizing": True, "memory_threshold": 0.8})
    finally:
        hook.remove()
    assert reply["status"] == "completed", reply.get("failed")
    assert (reply["processed_items"], reply["failed_items"], reply["total_items"]) == (50, 0, 50)
    seeds = [o["seed"] for o in reply["outputs"]]
    assert sorted(seeds) == list(range(1000, 1050))  # every item exactly once
    assert device_worker(worker).counters.out_of_memory >= 2  # 8 failed, then 4 failed
    assert max(seen[seen.index(2):]) <= 3  # after learning: never above what fits
    metrics = reply["metrics"]
    assert metrics["dynamic_adjustments"] >= 3  # 8 -> 4 -> 2 on OOM, grown back to 3
    assert metrics["total_images_generated"] == 50 and metrics["completed_batches"] >= 1
    assert device_worker(worker).counters.images_done == 50

    produced = outputs_by_seed(worker, reply)
    for seed in (1000, 1017, 1033, 1049):  # a sample: each equals its solo run
        solo = generate(worker, prompt="a pressure test", seed=seed, steps=4, background=False)
        assert_same_up_to_batch_rounding(produced[seed], worker.get_output(solo["outputs"][0]["output_id"]))


def test_memory_learned_from_forwards_sizes_the_next_ones(make_worker):
    worker = make_worker(scheduling={"max_batch_size": 8, "coalesce_wait_ms": 50})
    hook, seen = simulate_device_memory(worker, FakeMemoryProbe(total=1000, base=100, per_image=100),
                                        out_of_memory_above=100)
    try:
        first = worker.execute_batch(workflow_id="img-generation-basic", background=False,
                                     parameters={"steps": 3, "seed": 0, "total_images": 8},
                                     configuration={"memory_threshold": 0.5})
        seen.clear()
        second = worker.execute_batch(workflow_id="img-generation-basic", background=False,
                                      parameters={"steps": 3, "seed": 0, "total_images": 8},
                                      configuration={"memory_threshold": 0.5})
    finally:
        hook.remove()
    assert first["status"] == second["status"] == "completed"
    assert max(seen) == 4  # (0.5 x 1000 - 100) / 100 per image


def test_fixed_sizing_runs_exactly_the_preferred_size(make_worker):
    worker = make_worker(scheduling={"max_batch_size": 8, "coalesce_wait_ms": 50})
    rows: list[int] = []
    pipe = pipeline_of(worker)
    hook = pipe.unet.register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[0] // 2))
    try:
        reply = worker.execute_batch(workflow_id="img-generation-basic", background=False,
                                     parameters={"steps": 3, "seed": 0, "total_images": 6, "scheduler": "ddim"},
                                     configuration={"enable_dynamic_sizing": False, "preferred_batch_size": 3})
    finally:
        hook.remove()
    assert reply["status"] == "completed" and rows == [3] * 6


def test_rich_form_items_carry_their_own_parameters(worker):
    reply = worker.execute_batch(batch_id="rich", workflow_id="img-generation-basic", name="two prompts",
                                 priority=7, background=False, parameters={"steps": 3},
                                 items=[{"item_id": "fox", "parameters": {"prompt": "a fox", "seed": 5}},
                                        {"item_id": "owl", "parameters": {"prompt": "an owl", "seed": 6}}])
    assert reply["status"] == "completed" and reply["name"] == "two prompts" and reply["priority"] == 7
    assert [(o["item_id"], o["seed"]) for o in reply["outputs"]] == [("fox", 5), ("owl", 6)]
    items = worker.get_batch_status(batch_id="rich", include_items=True)["items"]
    assert [(i["item_id"], i["status"], i["seed"]) for i in items] == [("fox", "completed", 5), ("owl", "completed", 6)]
    alone = generate(worker, prompt="an owl", seed=6, steps=3, background=False)
    assert_same_up_to_batch_rounding(worker.get_output(reply["outputs"][1]["output_id"]),
                                     worker.get_output(alone["outputs"][0]["output_id"]))


def test_pause_resume_and_cancel_a_running_batch(make_worker):
    worker = make_worker(scheduling={"max_batch_size": 2})
    worker.execute_batch(batch_id="ctl", workflow_id="img-generation-basic",
                         parameters={"steps": 40, "seed": 0, "total_images": 6})
    wait_for(lambda: worker.get_batch_status(batch_id="ctl")["running_items"] > 0)
    paused = worker.control_batch(batch_id="ctl", action="pause")
    assert paused["status"] == "paused", paused
    done_at_pause = paused["processed_items"]
    other = generate(worker, background=False)  # the device is free while the batch waits
    assert other["status"] == "completed"
    assert worker.get_batch_status(batch_id="ctl")["processed_items"] == done_at_pause
    assert worker.control_batch(batch_id="ctl", action="resume")["status"] in ("pending", "running")
    wait_for(lambda: worker.get_batch_status(batch_id="ctl")["processed_items"] > done_at_pause)
    cancelled = worker.control_batch(batch_id="ctl", action="cancel", include_items=True)
    assert cancelled["status"] == "cancelled"
    assert {i["status"] for i in cancelled["items"]} <= {"completed", "cancelled"}
    assert worker.control_batch(batch_id="ctl", action="resume")["error_code"] == "invalid_state"


def test_failed_items_are_reported_then_retried_until_the_batch_completes(make_worker, model_cache, tmp_path):
    good = ensure_tiny_model("builtin:tiny-sd", model_cache)
    flaky = tmp_path / "flaky-model"
    shutil.copytree(good, flaky)
    weights = flaky / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # a half-copied model: one item's load fails for real
    worker = make_worker(models={"flaky": str(flaky)})
    items = [{"item_id": f"i{n}", "parameters": {"seed": n, **({"model": "flaky"} if n == 2 else {})}}
             for n in range(4)]
    reply = worker.execute_batch(batch_id="retry", workflow_id="img-generation-basic", background=False,
                                 parameters={"steps": 3}, items=items)
    assert reply["status"] == "failed" and reply["error"] == "1 of 4 items failed"
    [failure] = reply["failed"]
    assert failure["item_id"] == "i2" and failure["error_code"] == "unavailable"
    assert "model 'flaky' could not be loaded" in failure["error"]
    assert sorted(o["item_id"] for o in reply["outputs"]) == ["i0", "i1", "i3"]  # the others completed

    shutil.copy(good / "unet" / "diffusion_pytorch_model.safetensors", weights)  # the copy finishes
    retried = worker.control_batch(batch_id="retry", action="retry")
    assert retried["success"] and retried["status"] in ("pending", "running")
    wait_for(lambda: worker.get_batch_status(batch_id="retry")["status"] == "completed")
    final = worker.get_batch_status(batch_id="retry", include_items=True)
    assert final["processed_items"] == 4 and len(final["outputs"]) == 4
    assert [(i["item_id"], i["attempt"]) for i in final["items"]] == [("i0", 1), ("i1", 1), ("i2", 2), ("i3", 1)]
    assert final["attempt"] == 2
    assert worker.control_batch(batch_id="retry", action="retry")["error_code"] == "invalid_state"


def test_same_batch_id_twice_runs_once(worker):
    first = worker.execute_batch(batch_id="once", workflow_id="img-generation-basic", background=False,
                                 parameters={"steps": 3, "seed": 0, "total_images": 2})
    second = worker.execute_batch(batch_id="once", workflow_id="img-generation-basic", background=False,
                                  parameters={"steps": 3, "seed": 9, "total_images": 5})
    assert second["duplicate"] and second["total_items"] == 2 and second["outputs"] == first["outputs"]


def test_batch_status_is_safe_to_poll_from_many_threads(worker):
    worker.execute_batch(batch_id="polled", workflow_id="img-generation-basic",
                         parameters={"steps": 10, "seed": 0, "total_images": 6})
    errors = []

    def poll():
        for _ in range(200):
            reply = worker.get_batch_status(batch_id="polled", include_items=True)
            if not reply["success"] or reply["processed_items"] + reply["pending_items"] + reply["running_items"] \
                    + reply["failed_items"] + reply["cancelled_items"] != 6:
                errors.append(reply)

    threads = [threading.Thread(target=poll) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    wait_for(lambda: worker.get_batch_status(batch_id="polled")["status"] == "completed")


@pytest.mark.parametrize("request_data,code", [
    ({"batch_id": "x", "action": "explode"}, "invalid_request"),
    ({"batch_id": "ghost", "action": "pause"}, "not_found"),
])
def test_bad_batch_controls(worker, request_data, code):
    assert worker.control_batch(request_data)["error_code"] == code


def test_a_tracker_calls_back_with_progress_pace_and_eta(worker):
    reply = worker.execute_batch(batch_id="tracked", workflow_id="img-generation-basic",
                                 parameters={"steps": 20, "seed": 0, "total_images": 6},
                                 configuration={"max_batch_size": 2})
    updates: list[dict] = []
    with worker.track_batch(reply["batch_id"], on_update=updates.append) as tracker:
        final = tracker.wait(timeout=120)
    assert final["status"] == "completed" and final["processed_items"] == 6 and final["progress"] == 100
    assert final["eta_seconds"] == 0.0 and final["images_per_second"] > 0
    progress = [u["progress"] for u in updates]
    assert progress == sorted(progress) and len(set(progress)) > 3  # it moved, forward only
    assert any(u["eta_seconds"] and u["eta_seconds"] > 0 for u in updates if u["status"] == "running")
    status = worker.get_batch_status(batch_id="tracked")
    assert status["images_per_second"] == pytest.approx(final["images_per_second"], rel=0.05)
    assert worker.track_batch("ghost")["error_code"] == "not_found"


def test_parallel_processing_adds_device_workers_where_memory_allows(make_worker):
    worker = make_worker(scheduling={"max_batch_size": 2, "coalesce_wait_ms": 0})
    reply = worker.execute_batch(workflow_id="img-generation-basic", background=False,
                                 parameters={"steps": 6, "seed": 0, "total_images": 8},
                                 configuration={"parallel_processing": True, "max_parallel_batches": 2,
                                                "max_batch_size": 2})
    assert reply["status"] == "completed" and reply["parallel"]["added"] == ["ew-device-cpu0-1"]
    workers = testing.device_workers(worker)
    assert len(workers) == 2 and all(w.counters.images_done > 0 for w in workers)  # both did work
    assert sum(w.counters.images_done for w in workers) == 8


def test_parallel_processing_is_refused_when_memory_is_short(make_worker):
    worker = make_worker()
    device_worker(worker).monitor.probe = FakeMemoryProbe(total=1000, base=999, per_image=1)
    reply = worker.execute_batch(workflow_id="img-generation-basic", background=False,
                                 parameters={"steps": 3, "seed": 0, "total_images": 2},
                                 configuration={"parallel_processing": True, "max_parallel_batches": 4})
    assert reply["status"] == "completed" and reply["parallel"]["added"] == []
    assert reply["parallel"]["refused"][0]["free_bytes"] == 1 and len(testing.device_workers(worker)) == 1
