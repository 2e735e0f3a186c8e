"""Pause inside a denoising run, resume pixel-identical, cancel within one step, restart, delete."""

from __future__ import annotations

import numpy as np

from .conftest import StepGate, device_worker, generate, pipeline_of, run_of, session_status, wait_for


def current_task(worker, session_id):
    run = run_of(worker, session_id)
    return wait_for(lambda: run.all_tasks and run.all_tasks[0])


def test_pause_mid_denoising_then_resume_gives_the_uninterrupted_pixels(worker):
    reference = generate(worker, session_id="straight", steps=40, seed=1234, background=False)
    expected = worker.get_output(reference["outputs"][0]["output_id"])

    with StepGate(worker, forwards=12) as gate:
        generate(worker, session_id="paused", steps=40, seed=1234, background=True)
        task = current_task(worker, "paused")
        paused = gate.pause("paused")
    assert paused["status"] == "paused"
    held_at = task.step
    assert 12 <= held_at < 40
    assert paused["progress"] < 100 and paused["detailed_progress"]["eta_seconds"] is None

    # a paused session does not hold the device: other work runs to the end meanwhile
    other = generate(worker, session_id="meanwhile", steps=5, seed=5, background=False)
    assert other["status"] == "completed"
    assert task.step == held_at and session_status(worker, "paused")["status"] == "paused"

    assert worker.control_session(session_id="paused", action="resume")["status"] in ("pending", "running")
    wait_for(lambda: session_status(worker, "paused")["status"] == "completed")
    resumed = worker.get_output(session_status(worker, "paused")["outputs"][0]["output_id"])
    assert np.array_equal(resumed, expected)


def test_pause_of_queued_work_takes_effect_at_once_and_resume_runs_it(make_worker):
    worker = make_worker(scheduling={"max_batch_size": 1})
    generate(worker, session_id="blocker", steps=150, background=True)
    generate(worker, session_id="queued", steps=5, background=True)
    assert worker.control_session(session_id="queued", action="pause")["status"] == "paused"
    worker.control_session(session_id="blocker", action="cancel")
    assert worker.control_session(session_id="queued", action="resume")["success"]
    wait_for(lambda: session_status(worker, "queued")["status"] == "completed")


def test_cancel_stops_within_one_step_and_skips_the_vae_decode(worker):
    pipe = pipeline_of(worker)
    forwards, decodes = [], []
    unet_hook = pipe.unet.register_forward_hook(lambda *args: forwards.append(1))
    vae_hook = pipe.vae.decoder.register_forward_hook(lambda *args: decodes.append(1))
    try:
        generate(worker, session_id="doomed", steps=150, background=True)
        task = current_task(worker, "doomed")
        wait_for(lambda: task.step >= 5)
        reply = worker.control_session(session_id="doomed", action="cancel")
        assert reply["status"] == "cancelled"
        at_cancel = len(forwards)
        wait_for(lambda: task.future.done())
        assert len(forwards) - at_cancel <= 1  # the forward in flight finishes; no other starts
        assert task.step < 150 and decodes == []
    finally:
        unet_hook.remove()
        vae_hook.remove()
    assert session_status(worker, "doomed")["outputs"] == []


def test_restart_reruns_the_same_request_as_a_new_attempt(worker):
    generate(worker, session_id="again", steps=150, seed=77, background=True)
    current_task(worker, "again")
    assert worker.control_session(session_id="again", action="cancel")["status"] == "cancelled"
    restarted = worker.control_session(session_id="again", action="restart")
    assert restarted["status"] in ("pending", "running") and restarted["attempt"] == 2
    wait_for(lambda: session_status(worker, "again")["status"] == "completed", timeout=120)
    final = session_status(worker, "again")
    assert final["outputs"][0]["seed"] == 77 and final["attempt"] == 2


def test_restart_while_running_replaces_the_run(worker):
    generate(worker, session_id="swap", steps=150, background=True)
    first = current_task(worker, "swap")
    worker.control_session(session_id="swap", action="restart")
    wait_for(lambda: first.future.done())
    wait_for(lambda: session_status(worker, "swap")["status"] == "completed", timeout=120)
    assert len(session_status(worker, "swap")["outputs"]) == 1


def test_progress_combines_workflow_step_and_denoising_step(worker):
    generate(worker, session_id="watched", steps=150, background=True)
    task = current_task(worker, "watched")
    wait_for(lambda: task.step >= 75)
    status = session_status(worker, "watched")
    assert status["status"] == "running" and status["current_step"] == 1 and status["total_steps"] == 2
    detail = status["detailed_progress"]
    assert detail["current_operation"] == "inference.text2img"
    assert 0.4 < detail["substep_progress"] < 1.0
    assert 45 <= status["progress"] < 99  # steps weigh by their work: 150 denoising steps, then a save
    assert detail["eta_seconds"] > 0 and detail["queue_seconds"] >= 0 and detail["run_seconds"] > 0
    worker.control_session(session_id="watched", action="cancel")


def test_same_seed_gives_identical_pixels(worker):
    a = generate(worker, seed=2024, background=False)
    b = generate(worker, seed=2024, background=False)
    c = generate(worker, seed=2025, background=False)
    pixels = [worker.get_output(r["outputs"][0]["output_id"]) for r in (a, b, c)]
    assert np.array_equal(pixels[0], pixels[1])
    assert not np.array_equal(pixels[0], pixels[2])


def test_device_worker_is_a_named_thread(worker):
    thread = device_worker(worker).thread
    assert thread.name.startswith("ew-device-") and thread.is_alive()
