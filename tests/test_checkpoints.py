"""Durable denoise state in a worker: a suspending close costs no step, a pause survives a restart at its
step, a checkpoint that cannot be used restarts only its own image from step 0 (with the reason logged),
and the checkpoints of work that ended are gone with it. Steps are counted per forward on the device
thread, never timed."""

from __future__ import annotations

import re
import threading

import numpy as np
import pytest

from embedded_worker import testing

from .conftest import assert_same_up_to_batch_rounding, generate, session_status, wait_for

STEPS = 10


class StepLog:
    """Counts the forwards of each session's images on the device (a step hook), and can hold the device
    after the Nth until the worker is closing, so a close lands exactly at that boundary."""

    def __init__(self, worker, hold_after: int | None = None):
        self.forwards: dict[str, list[int]] = {}  # record id -> the step index after each of its forwards
        self.hold_after, self.count = hold_after, 0
        self.held = threading.Event()
        self.remove = testing.on_step(worker, self._hook)

    def _hook(self, device) -> None:
        for cohort in device.active.cohorts:
            for task in cohort.members:
                self.forwards.setdefault(task.record_id, []).append(cohort.step_index)
        self.count += 1
        if self.count == self.hold_after:
            self.held.set()
            wait_for(lambda: testing.stopping(device), timeout=120)


def held_after(worker, log: StepLog, forwards: int):
    """Hold the device after its `forwards`th forward (counted by `log`) until released: (reached, release,
    remove the hold)."""
    reached, release = threading.Event(), threading.Event()

    def hold(_device) -> None:
        if log.count == forwards and not reached.is_set():
            reached.set()
            release.wait(120)

    return reached, release, testing.on_step(worker, hold)


def total_steps(log: StepLog, record_id: str) -> int:
    """The schedule's length, as the last forward counted it (PNDM's schedule is a step longer than asked)."""
    last = log.forwards[record_id][-1]
    assert last >= STEPS
    return last


def closed_at_step(durable, session_id: str, at: int, **parameters) -> StepLog:
    """A session run until its `at`th step, then the worker closed (suspending) right at that boundary."""
    worker = durable(checkpoints={"every_steps": 1000})  # no periodic checkpoint: only the close takes state
    log = StepLog(worker, hold_after=at)
    generate(worker, session_id=session_id, background=True, steps=STEPS, **parameters)
    assert log.held.wait(300)
    closing = threading.Thread(target=worker.close, kwargs={"timeout": 60, "pending": "suspend"})
    closing.start()
    closing.join(300)
    return log


def solo_pixels(worker, seed: int) -> np.ndarray:
    reply = generate(worker, seed=seed, steps=STEPS)
    return worker.get_output(reply["outputs"][0]["output_id"])


def output_pixels(worker, session_id: str) -> np.ndarray:
    return worker.get_output(session_status(worker, session_id)["outputs"][0]["output_id"])


def test_a_suspending_close_costs_no_step_and_the_image_ends_with_the_same_pixels(durable):
    first = closed_at_step(durable, "suspended", at=4, seed=31)
    assert first.forwards["suspended"] == [1, 2, 3, 4]
    second = durable()
    log = StepLog(second)
    status = wait_for(lambda: (s := session_status(second, "suspended"))["status"] == "completed" and s)
    assert log.forwards["suspended"] == list(range(5, total_steps(log, "suspended") + 1))  # not one step again
    assert status["detailed_progress"]["resumed_from_step"] == 4
    checkpoints = testing.device_workers(second)[0].status()["checkpoints"]
    assert checkpoints["resumed_images"] == 1 and checkpoints["steps_restored"] == 4
    assert checkpoints["steps_recomputed_at_most"] == 0  # taken where it stopped
    np.testing.assert_array_equal(output_pixels(second, "suspended"), solo_pixels(second, 31))
    assert testing.checkpoint_files(second, "suspended") == []  # it completed: its state is gone


def test_a_paused_image_survives_a_restart_and_continues_at_its_step(durable):
    worker = durable(checkpoints={"every_steps": 1000})
    log = StepLog(worker)
    gate_reached, release, remove = held_after(worker, log, 3)
    generate(worker, session_id="paused", background=True, steps=STEPS, seed=41)
    assert gate_reached.wait(300)
    pausing = threading.Thread(target=worker.control_session, kwargs={"session_id": "paused", "action": "pause"})
    pausing.start()
    wait_for(lambda: testing.run_of(worker, "paused").state.value in ("pausing", "paused"))
    release.set()
    pausing.join(120)
    remove()
    assert session_status(worker, "paused")["status"] == "paused"
    worker.close(timeout=60, pending="suspend")
    assert log.forwards["paused"] == [1, 2, 3]

    second = durable()
    assert session_status(second, "paused")["status"] == "paused"
    after = StepLog(second)
    second.control_session(session_id="paused", action="resume")
    status = wait_for(lambda: (s := session_status(second, "paused"))["status"] == "completed" and s)
    assert after.forwards["paused"] == list(range(4, total_steps(after, "paused") + 1))
    assert status["detailed_progress"]["resumed_from_step"] == 3
    np.testing.assert_array_equal(output_pixels(second, "paused"), solo_pixels(second, 41))


@pytest.mark.parametrize("damage", ["truncated", "newer format"])
def test_an_unusable_checkpoint_restarts_only_its_image_from_step_zero_and_says_why(durable, damage):
    worker = durable(checkpoints={"every_steps": 1000})
    log = StepLog(worker, hold_after=3)
    for session_id, seed in (("damaged", 51), ("intact", 52)):
        generate(worker, session_id=session_id, background=True, steps=STEPS, seed=seed)
    assert log.held.wait(300)
    worker.close(timeout=60, pending="suspend")
    (damaged,) = testing.checkpoint_files(worker, "damaged")
    data = damaged.read_bytes()
    if damage == "truncated":
        damaged.write_bytes(data[: len(data) // 2])
    else:  # the same bytes claiming a format this version does not know
        damaged.write_bytes(data.replace(b'\\"format_version\\": 1', b'\\"format_version\\": 9'))
        assert damaged.read_bytes() != data

    second = durable()
    after = StepLog(second)
    statuses = {s: wait_for(lambda s=s: (r := session_status(second, s))["status"] == "completed" and r)
                for s in ("damaged", "intact")}
    reason = "torn|cannot be read" if damage == "truncated" else "format version 9"
    logged = second.drain_logs()["records"]
    refused = [r["message"] for r in logged if "starts from step 0" in r["message"]]
    assert len(refused) == 1 and "damaged" in refused[0]
    assert re.search(reason, refused[0]), refused[0]
    assert after.forwards["damaged"][0] == 1 and after.forwards["intact"][0] == 4
    assert statuses["intact"]["detailed_progress"]["resumed_from_step"] == 3
    assert statuses["damaged"]["detailed_progress"]["resumed_from_step"] is None
    np.testing.assert_array_equal(output_pixels(second, "damaged"), solo_pixels(second, 51))


def test_the_checkpoints_of_work_that_ends_go_with_it(durable):
    worker = durable(checkpoints={"every_steps": 2})
    log = StepLog(worker)
    held, release, remove = held_after(worker, log, 5)
    generate(worker, session_id="cancelled", background=True, steps=STEPS)
    assert held.wait(300)
    wait_for(lambda: testing.checkpoint_files(worker, "cancelled"))
    (kept,) = testing.checkpoint_files(worker, "cancelled")  # the newest only: each write replaces the last
    assert kept.name == "1.0.4.state"  # step 1 of the workflow, its image 0, at denoising step 4
    worker.control_session(session_id="cancelled", action="cancel")
    release.set()
    remove()
    wait_for(lambda: session_status(worker, "cancelled")["status"] == "cancelled")
    testing.drain(worker)
    wait_for(lambda: testing.checkpoint_files(worker, "cancelled") == [], timeout=60)
    assert worker.get_status()["state"]["checkpoints"]["stored"] == 0


def test_a_paused_images_state_in_host_memory_is_counted_and_continues_exactly(durable):
    """What an accelerator does with a paused image (its state leaves device memory), forced on the CPU: the
    memory monitor counts it while it waits; resumed, it continues at its step; still paused at a suspending
    close, it is written and continues at its step after the restart."""
    worker = durable(checkpoints={"every_steps": 1000})
    testing.park_in_host_memory(worker)
    log = StepLog(worker)
    reached, release, remove = held_after(worker, log, 3)
    for session_id, seed in (("here", 61), ("kept", 62)):
        generate(worker, session_id=session_id, background=True, steps=STEPS, seed=seed)
    assert reached.wait(300)
    pausing = [threading.Thread(target=worker.control_session, kwargs={"session_id": s, "action": "pause"})
               for s in ("here", "kept")]
    for thread in pausing:
        thread.start()
    wait_for(lambda: all(testing.run_of(worker, s).state.value in ("pausing", "paused") for s in ("here", "kept")))
    release.set()
    for thread in pausing:
        thread.join(120)
    remove()
    tasks = {s: testing.run_of(worker, s).all_tasks[0] for s in ("here", "kept")}
    assert all(t.parked is None and t.resume_from.step == 3 for t in tasks.values())  # off the device
    memory = lambda w: w.get_status()["device"]["memory"]["cpu"]["parked_host_bytes"]  # noqa: E731
    assert memory(worker) == sum(len(t.resume_from.data) for t in tasks.values())
    kept_bytes = len(tasks["kept"].resume_from.data)
    worker.control_session(session_id="here", action="resume")
    wait_for(lambda: session_status(worker, "here")["status"] == "completed")
    assert log.forwards["here"][3] == 4 and memory(worker) == kept_bytes  # continued at its step
    assert_same_up_to_batch_rounding(output_pixels(worker, "here"), solo_pixels(worker, 61))
    worker.close(timeout=60, pending="suspend")

    second = durable()
    after = StepLog(second)
    second.control_session(session_id="kept", action="resume")
    status = wait_for(lambda: (s := session_status(second, "kept"))["status"] == "completed" and s)
    assert after.forwards["kept"][0] == 4 and status["detailed_progress"]["resumed_from_step"] == 3
    assert_same_up_to_batch_rounding(output_pixels(second, "kept"), solo_pixels(second, 62))
