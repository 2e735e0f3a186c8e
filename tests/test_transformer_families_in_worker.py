"""Flux, SD3 and Chroma through the worker: the family-agnostic loop gives them pause/resume, coalescing and cancel."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest

from embedded_worker.diffusion.families import adapter_for

from .conftest import (
    StepGate,
    assert_same_up_to_batch_rounding,
    device_worker,
    pipeline_of,
    run_of,
    session_status,
    wait_for,
)

FAMILIES = ["builtin:tiny-flux", "builtin:tiny-flux-schnell", "builtin:tiny-sd3", "builtin:tiny-chroma"]


def generate(worker, model: str, session_id: str | None = None, background: bool = False, **parameters) -> dict:
    params = {"prompt": "a red fox", "seed": 7, "steps": 4, "width": 32, "height": 32, "guidance_scale": 3.5,
              "model": model, **parameters}
    request = {"workflow_id": "img-generation-basic", "parameters": params, "background": background}
    if session_id is not None:
        request["session_id"] = session_id
    return worker.execute_workflow(request)


def current_task(worker, session_id: str):
    run = wait_for(lambda: run_of(worker, session_id))
    return wait_for(lambda: run.all_tasks and run.all_tasks[0])


def pixels(worker, reply: dict) -> np.ndarray:
    """An output's pixels, checked to be a picture: NaN latents or weights decode to one flat colour, and
    two flat images would compare equal whatever the loop did."""
    image = worker.get_output(reply["outputs"][0]["output_id"])
    assert image.std() > 1, "a flat image: the model's weights or latents are broken"
    return image


@pytest.mark.parametrize("model", FAMILIES)
def test_pause_mid_denoising_then_resume_gives_the_uninterrupted_pixels(worker, model):
    expected = pixels(worker, generate(worker, model, session_id="straight"))

    with StepGate(worker, forwards=2) as gate:
        generate(worker, model, session_id="paused", background=True)
        task = current_task(worker, "paused")
        paused = gate.pause("paused")
    assert paused["status"] == "paused"
    held_at = task.step
    assert 2 <= held_at < 4
    other = generate(worker, model, session_id="meanwhile", seed=5)  # the paused image does not hold the device
    assert other["status"] == "completed" and task.step == held_at

    assert worker.control_session(session_id="paused", action="resume")["success"]
    wait_for(lambda: session_status(worker, "paused")["status"] == "completed")
    assert np.array_equal(pixels(worker, session_status(worker, "paused")), expected)


@pytest.mark.parametrize("model", FAMILIES)
def test_concurrent_sessions_share_forwards_and_keep_their_pixels(make_worker, model):
    worker = make_worker(scheduling={"coalesce_wait_ms": 300})
    device = device_worker(worker)
    solo = {seed: pixels(worker, generate(worker, model, seed=seed)) for seed in range(3)}
    forwards_before = device.counters.forwards
    replies: dict[int, dict] = {}
    threads = [threading.Thread(target=lambda s=seed: replies.__setitem__(s, generate(worker, model, seed=s)))
               for seed in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    forwards = device.counters.forwards - forwards_before
    assert forwards < 3 * 4, f"{forwards} forwards for 3 images of 4 steps"
    for seed, reply in replies.items():
        assert reply["status"] == "completed"
        assert_same_up_to_batch_rounding(pixels(worker, reply), solo[seed])


@pytest.mark.parametrize("model", FAMILIES)
def test_cancel_stops_an_image_within_one_step_and_skips_the_decode(worker, model):
    pipe = pipeline_of(worker, model)
    forwards, decodes = [], []
    hooks = [adapter_for(pipe).denoiser(pipe).register_forward_hook(lambda *args: forwards.append(1)),
             pipe.vae.decoder.register_forward_hook(lambda *args: decodes.append(1))]
    try:
        generate(worker, model, session_id="doomed", steps=150, background=True)
        task = current_task(worker, "doomed")
        wait_for(lambda: task.step >= 2)
        assert worker.control_session(session_id="doomed", action="cancel")["status"] == "cancelled"
        at_cancel = len(forwards)
        wait_for(lambda: task.future.done())
        assert len(forwards) - at_cancel <= 1 and task.step < 150 and decodes == []
    finally:
        for hook in hooks:
            hook.remove()


def test_a_folder_of_an_unsupported_pipeline_class_is_refused_naming_the_class(make_worker, tmp_path):
    folder = tmp_path / "qwen"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "QwenImagePipeline"}))
    worker = make_worker(models={"qwen": str(folder)})
    reply = worker.execute("inference.text2img", {"prompt": "x", "model": "qwen"})
    assert reply["error_code"] == "invalid_request"
    assert "'QwenImagePipeline' is not supported" in reply["error"] and "FluxPipeline" in reply["error"]
    healthy = worker.execute("inference.text2img", {"prompt": "x", "steps": 3, "background": False})
    assert healthy["status"] == "completed"


def test_model_status_names_each_models_family_without_building_it(worker, tmp_path):
    families = {m["model_id"]: m["family"] for m in worker.execute("model.get_status", {})["models"]}
    assert families["builtin:tiny-sd"] == "sd" and families["builtin:tiny-sdxl"] == "sdxl"
    assert families["builtin:tiny-flux"] == families["builtin:tiny-flux-schnell"] == "flux"
    assert families["builtin:tiny-sd3"] == "sd3" and families["builtin:shapes"] == "sd"
    assert families["builtin:tiny-chroma"] == "chroma"


@pytest.mark.parametrize("model", FAMILIES)
def test_img2img_runs_through_the_worker_and_strength_changes_the_result(worker, model):
    """Pixel identity with each family's img2img pipeline is in test_transformer_families_match_pipeline;
    random weights keep too little of an image to measure how far strength moves it, only that it decides
    the result."""
    source = generate(worker, model, seed=3)
    results = {}
    for strength in (0.25, 1.0):
        reply = worker.execute_workflow(workflow_id="img2img-basic", background=False, parameters={
            "init_image": source["outputs"][0]["output_id"], "prompt": "a blue house", "strength": strength,
            "steps": 4, "seed": 4, "width": 32, "height": 32, "model": model})
        assert reply["status"] == "completed", reply
        results[strength] = pixels(worker, reply)
    assert not np.array_equal(results[0.25], results[1.0])
    assert not np.array_equal(results[0.25], pixels(worker, source))


def test_models_are_never_built_while_another_loads(tmp_path, monkeypatch):
    """Loading switches torch's weight initialisers off for the whole process; a tiny model built on another
    thread meanwhile kept garbage weights (NaN in tiny Flux's VAE). A load holds the construction lock,
    so a build waits for it."""
    import threading

    import diffusers
    import torch

    from embedded_worker.diffusion import models, tiny_model

    loading, release = threading.Event(), threading.Event()

    def held_load(*args, **kwargs):
        loading.set()
        release.wait(60)
        raise RuntimeError("the load under test ends here")

    monkeypatch.setattr(diffusers.DiffusionPipeline, "from_pretrained", held_load)
    folder = tiny_model.ensure_tiny_model("builtin:tiny-sd", tmp_path)
    loader = threading.Thread(target=lambda: pytest.raises(RuntimeError, models.load_pipeline, folder,
                                                           torch.device("cpu"), torch.float32))
    loader.start()
    try:
        assert loading.wait(60)
        assert not tiny_model.CONSTRUCTION_LOCK.acquire(blocking=False)  # a build would wait here
    finally:
        release.set()
        loader.join(60)
    assert tiny_model.CONSTRUCTION_LOCK.acquire(blocking=False)
    tiny_model.CONSTRUCTION_LOCK.release()


@pytest.mark.parametrize("model", FAMILIES)
def test_a_preempted_then_paused_then_resumed_session_is_exact(make_worker, model):
    """test_preemption's exact case on each transformer family."""
    from .test_preemption import check_preempted_then_paused_then_resumed_is_exact

    check_preempted_then_paused_then_resumed_is_exact(make_worker, 6, model, scheduler="default", width=32,
                                                      height=32, guidance_scale=3.5)


@pytest.mark.parametrize("model", FAMILIES)
def test_a_batch_gives_each_item_its_own_seed_and_its_solo_pixels(worker, model):
    reply = worker.execute_batch(workflow_id="img-generation-basic", background=False, parameters={
        "prompt": "a red fox", "seed": 40, "steps": 4, "total_images": 3, "width": 32, "height": 32,
        "guidance_scale": 3.5, "model": model})
    assert reply["status"] == "completed", reply
    outputs = {o["seed"]: worker.get_output(o["output_id"]) for o in reply["outputs"]}
    assert sorted(outputs) == [40, 41, 42]
    for seed, image in outputs.items():
        assert_same_up_to_batch_rounding(image, pixels(worker, generate(worker, model, seed=seed)))
    assert not np.array_equal(outputs[40], outputs[41])


def test_configured_models_that_cannot_run_are_reported_at_start_with_every_models_family(make_worker, tmp_path):
    unsupported = tmp_path / "qwen"
    unsupported.mkdir()
    (unsupported / "model_index.json").write_text(json.dumps({"_class_name": "QwenImagePipeline"}))
    worker = make_worker(models={"qwen": str(unsupported), "gone": str(tmp_path / "gone")})
    logged = " ".join(r["message"] for r in worker.drain_logs()["records"] if r["level"] == "WARNING")
    assert "'qwen' cannot run" in logged and "QwenImagePipeline" in logged and "'gone' cannot run" in logged

    status = {m["model_id"]: m for m in worker.execute("model.get_status", {})["models"]}
    assert "'QwenImagePipeline' is not supported" in status["qwen"]["problem"]
    assert "not found" in status["gone"]["problem"]
    assert status["builtin:tiny-flux"]["problem"] is None

    listed = {m["model_id"]: m for m in worker.get_workflows()["models"]}
    assert listed["builtin:tiny-flux"]["family"] == "flux" and listed["builtin:tiny-sd3"]["family"] == "sd3"
    assert listed["builtin:tiny-chroma"]["family"] == "chroma" and listed["builtin:tiny-sd"]["family"] == "sd"
    assert listed["qwen"]["family"] is None and "QwenImagePipeline" in listed["qwen"]["problem"]
    assert worker.execute("inference.text2img", {"prompt": "x", "steps": 2, "background": False})["status"] \
        == "completed"  # the worker runs the models that can


def test_a_folder_whose_model_index_is_not_json_is_refused_clearly(make_worker, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model_index.json").write_text("{not json")
    worker = make_worker(models={"broken": str(broken)})
    reply = worker.execute("inference.text2img", {"prompt": "x", "model": "broken"})
    assert reply["error_code"] == "invalid_request" and "model_index.json cannot be read" in reply["error"]


ROWS_PER_IMAGE = {"builtin:tiny-flux": 1, "builtin:tiny-flux-schnell": 1,  # no classifier-free guidance
                  "builtin:tiny-sd3": 2, "builtin:tiny-chroma": 2}


@pytest.mark.parametrize("model", FAMILIES)
def test_a_batch_survives_injected_out_of_memory_each_image_exactly_once(make_worker, model):
    """test_batches' OOM back-off on each transformer family: forwards of more than 3 images fail as a full
    GPU does; the sizer halves 8 -> 4 -> 2, grows back to 3 and never above, every image made once and
    each its solo pixels."""
    from .test_batches import FakeMemoryProbe, simulate_device_memory

    worker = make_worker(scheduling={"max_batch_size": 8, "coalesce_wait_ms": 50})
    hook, seen = simulate_device_memory(worker, FakeMemoryProbe(total=1000, base=100, per_image=200),
                                        out_of_memory_above=3, model_id=model, rows_per_image=ROWS_PER_IMAGE[model])
    try:
        reply = worker.execute_batch(workflow_id="img-generation-basic", background=False, parameters={
            "prompt": "a red fox", "seed": 100, "steps": 3, "total_images": 12, "width": 32, "height": 32,
            "guidance_scale": 3.5, "model": model}, configuration={
            "total_images": 12, "max_batch_size": 8, "enable_dynamic_sizing": True, "memory_threshold": 0.8})
    finally:
        hook.remove()
    assert reply["status"] == "completed", reply.get("failed")
    assert sorted(o["seed"] for o in reply["outputs"]) == list(range(100, 112))
    assert device_worker(worker).counters.out_of_memory >= 2  # 8 failed, then 4 failed
    assert max(seen[seen.index(2):]) <= 3  # after learning: never above what fits
    produced = {o["seed"]: worker.get_output(o["output_id"]) for o in reply["outputs"]}
    for seed in (100, 111):
        assert_same_up_to_batch_rounding(produced[seed], pixels(worker, generate(worker, model, seed=seed, steps=3)))


@pytest.mark.parametrize("model", FAMILIES)
def test_memory_learned_from_forwards_sizes_the_next_ones(make_worker, model):
    from .test_batches import FakeMemoryProbe, simulate_device_memory

    worker = make_worker(scheduling={"max_batch_size": 8, "coalesce_wait_ms": 50})
    hook, seen = simulate_device_memory(worker, FakeMemoryProbe(total=1000, base=100, per_image=100),
                                        out_of_memory_above=100, model_id=model,
                                        rows_per_image=ROWS_PER_IMAGE[model])
    parameters = {"prompt": "a red fox", "steps": 3, "seed": 0, "total_images": 8, "width": 32, "height": 32,
                  "guidance_scale": 3.5, "model": model}
    try:
        first = worker.execute_batch(workflow_id="img-generation-basic", background=False, parameters=parameters,
                                     configuration={"memory_threshold": 0.5})
        seen.clear()
        second = worker.execute_batch(workflow_id="img-generation-basic", background=False, parameters=parameters,
                                      configuration={"memory_threshold": 0.5})
    finally:
        hook.remove()
    assert first["status"] == second["status"] == "completed"
    assert max(seen) == 4  # (0.5 x 1000 - 100) / 100 per image
