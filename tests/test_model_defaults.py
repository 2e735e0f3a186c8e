"""A request that leaves steps or guidance empty gets its model's own, not SD's 20 steps at 7.5."""

from __future__ import annotations

import pytest

from embedded_worker.diffusion.families.defaults import ModelDefaults

OWN = {  # model -> (steps, guidance_scale): each pipeline's (or model card's) own call
    "builtin:tiny-sd": (20, 7.5),
    "builtin:tiny-flux": (28, 3.5),
    "builtin:tiny-flux-schnell": (4, 0.0),
    "builtin:tiny-sd3": (28, 7.0),
    "builtin:tiny-chroma": (35, 5.0),
}


def made_with(worker, reply: dict) -> tuple[int, float]:
    assert reply["status"] == "completed", reply
    metadata = worker.output_info(reply["outputs"][0]["output_id"])["metadata"]
    return metadata["steps"], metadata["guidance_scale"]


@pytest.mark.parametrize("model", OWN)
def test_a_workflow_request_without_steps_or_guidance_gets_the_models_own(worker, model):
    reply = worker.execute_workflow(workflow_id="img-generation-basic", background=False, parameters={
        "prompt": "a red fox", "seed": 1, "width": 32, "height": 32, "model": model})
    assert made_with(worker, reply) == OWN[model]


def test_a_stated_value_is_kept_and_a_default_over_the_step_limit_runs_at_the_limit(make_worker):
    worker = make_worker(limits={"max_steps": 10})
    reply = worker.execute_workflow(workflow_id="img-generation-basic", background=False, parameters={
        "prompt": "a red fox", "seed": 1, "width": 32, "height": 32, "model": "builtin:tiny-flux",
        "guidance_scale": 2.0})
    assert made_with(worker, reply) == (10, 2.0)


def test_a_coordination_step_gets_the_defaults_of_the_model_the_request_loads(worker):
    reply = worker.execute_workflow(background=False, coordination_mode="sequential", domains=[
        {"domain": "model", "operation": "load_model", "parameters": {"model_id": "builtin:tiny-flux-schnell"}},
        {"domain": "inference", "operation": "text2img",
         "parameters": {"prompt": "a red fox", "seed": 2, "width": 32, "height": 32}}])
    assert made_with(worker, reply) == OWN["builtin:tiny-flux-schnell"]


def test_recommend_batch_size_takes_the_models_own_guidance_and_size(worker):
    flux = worker.execute("inference.recommend_batch_size", {"model": "builtin:tiny-flux-schnell"})
    assert flux["guidance"] is False  # schnell draws unguided; SD's 7.5 would have said True
    sd = worker.execute("inference.recommend_batch_size", {"model": "builtin:tiny-sd"})
    assert sd["guidance"] is True


def test_model_status_gives_each_models_defaults(worker):
    for model in ("builtin:tiny-flux", "builtin:tiny-sd3", "builtin:tiny-chroma"):
        assert worker.execute("model.load_model", {"model_id": model})["success"]
    models = {m["model_id"]: m for m in worker.execute("model.get_status", {})["models"]}
    assert models["builtin:tiny-flux"]["defaults"]["guidance_scale"] == 3.5
    assert models["builtin:tiny-sd3"]["defaults"]["max_sequence_length"] == 256
    assert ModelDefaults(**models["builtin:tiny-chroma"]["defaults"]).steps == 35


def test_a_models_native_size_is_read_from_its_folder_once_not_per_image(worker, monkeypatch):
    """The lifecycle loop asks for it at every image it launches; reading the configs each time held the GIL
    the device thread steps with."""
    from embedded_worker.diffusion import models

    reads = []
    real = models.native_size
    monkeypatch.setattr(models, "native_size", lambda folder: reads.append(folder) or real(folder))
    for seed in (1, 5):
        batch = worker.execute_batch(workflow_id="img-generation-basic", background=False, parameters={
            "prompt": "a red fox", "seed": seed, "steps": 1, "total_images": 4, "model": "builtin:tiny-flux"})
        assert batch["status"] == "completed", batch
    assert len(reads) <= 1, reads
