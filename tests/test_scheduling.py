"""Queue policy: priority first, FIFO within a priority, aging against starvation, coalescing."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from embedded_worker.diffusion.denoise import ImageSpec
from embedded_worker.diffusion.task import DenoiseTask
from embedded_worker.diffusion.work_queue import WorkQueue

from .conftest import assert_same_up_to_batch_rounding, device_worker, generate, session_status, settle, wait_for


def queued(queue: WorkQueue, priority: int, at: float, name: str) -> DenoiseTask:
    task = DenoiseTask(ImageSpec(model_id="m", prompt=name), priority, submitted_at=at)
    queue.put(task)
    return task


def take_all(queue: WorkQueue) -> list[str]:
    with queue.cond:
        key = queue.best_key()
        return [t.spec.prompt for t in queue.take(key, 100, lambda t: True)]


def test_higher_priority_first_then_first_come_first_served():
    queue = WorkQueue(aging_per_second=0.0)
    for at, (priority, name) in enumerate([(1, "low"), (10, "urgent-a"), (5, "mid"), (10, "urgent-b")]):
        queued(queue, priority, float(at), name)
    assert take_all(queue) == ["urgent-a", "urgent-b", "mid", "low"]


def test_aging_lets_long_waiting_low_priority_work_overtake():
    queue = WorkQueue(aging_per_second=0.1)  # a point of priority per 10 s of waiting
    queued(queue, 1, 0.0, "waited-100s")
    queued(queue, 10, 100.0, "fresh-urgent")
    queued(queue, 5, 95.0, "waited-5s")
    assert take_all(queue) == ["waited-100s", "fresh-urgent", "waited-5s"]


def test_withdrawn_tasks_are_skipped():
    queue = WorkQueue(aging_per_second=0.0)
    first = queued(queue, 5, 0.0, "first")
    queued(queue, 5, 1.0, "second")
    assert queue.withdraw(first, "parked") and not queue.withdraw(first, "parked")
    assert take_all(queue) == ["second"] and queue.pending() == 0


def test_sessions_start_in_priority_order_on_a_busy_device(make_worker):
    worker = make_worker(scheduling={"max_batch_size": 1, "coalesce_wait_ms": 0})
    # the blocker at the top priority: nothing waiting outranks it, so it is not preempted and all four queue
    worker.execute_workflow(session_id="blocker", workflow_id="img-generation-basic", priority=10,
                            parameters={"prompt": "a red fox in the snow", "seed": 7, "steps": 150})
    wait_for(lambda: session_status(worker, "blocker")["status"] == "running")
    for session_id, priority in [("p1", 1), ("p10-a", 10), ("p5", 5), ("p10-b", 10)]:
        reply = worker.execute_workflow(session_id=session_id, workflow_id="img-generation-basic", priority=priority,
                                        parameters={"prompt": "x", "steps": 3, "seed": 1})
        assert reply["success"]
    wait_for(lambda: worker._engine.pool.pending() == 4)  # all queued behind the blocker
    worker.control_session(session_id="blocker", action="cancel")
    settle(worker, ["p1", "p10-a", "p5", "p10-b"])
    started = sorted(["p1", "p10-a", "p5", "p10-b"], key=lambda s: session_status(worker, s)["started_at"])
    assert started == ["p10-a", "p10-b", "p5", "p1"]


def test_concurrent_single_image_sessions_share_forwards_and_keep_their_pixels(make_worker):
    worker = make_worker(scheduling={"coalesce_wait_ms": 300})
    device = device_worker(worker)
    device.call(lambda w: w.pipeline("builtin:tiny-sd")).result(60)
    solo = {}
    for seed in range(8):
        reply = generate(worker, seed=seed, steps=8, background=False)
        solo[seed] = worker.get_output(reply["outputs"][0]["output_id"])
    forwards_before = device.counters.forwards

    replies: dict[int, dict] = {}
    threads = [threading.Thread(target=lambda s=seed: replies.__setitem__(s, generate(worker, seed=s, steps=8,
                                                                                     background=False)))
               for seed in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    forwards = device.counters.forwards - forwards_before
    assert forwards < 8 * 8 // 2, f"{forwards} forwards for 8 images of 8 steps"
    for seed, reply in replies.items():
        assert reply["status"] == "completed"
        assert_same_up_to_batch_rounding(worker.get_output(reply["outputs"][0]["output_id"]), solo[seed])


@pytest.mark.parametrize("size", [1, 3])
def test_max_batch_size_caps_the_images_in_one_forward(make_worker, size):
    worker = make_worker(scheduling={"max_batch_size": size, "coalesce_wait_ms": 100})
    pipe_rows = []
    device = device_worker(worker)
    pipe = device.call(lambda w: w.pipeline("builtin:tiny-sd")[0]).result(60)
    hook = pipe.unet.register_forward_pre_hook(lambda module, args: pipe_rows.append(args[0].shape[0]))
    try:
        reply = worker.execute_batch(workflow_id="img-generation-basic", background=False,
                                     parameters={"prompt": "x", "steps": 3, "seed": 0, "total_images": 5,
                                                 "scheduler": "ddim"})
    finally:
        hook.remove()
    assert reply["status"] == "completed"
    assert max(pipe_rows) == 2 * size  # two rows per image with guidance
    assert np.sum(pipe_rows) == 2 * 5 * 3  # DDIM: one forward per step
