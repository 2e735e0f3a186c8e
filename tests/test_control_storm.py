"""A storm of pause/resume/cancel/restart/delete from eight threads against the same sessions."""

from __future__ import annotations

import contextlib
import random
import subprocess
import sys
import threading
import time
from typing import Iterator

import pytest

from embedded_worker import testing
from embedded_worker.lifecycle.state import ALL_STATUSES

from .conftest import generate, settle, wait_for

VERBS = ("pause", "resume", "cancel", "restart", "delete")


def test_control_storm_leaves_no_illegal_state_and_nothing_stuck(make_worker):
    worker = make_worker(scheduling={"coalesce_wait_ms": 2})
    ids = [f"storm-{i}" for i in range(6)]
    for index, session_id in enumerate(ids):
        generate(worker, session_id=session_id, steps=12, seed=index, background=True)
    stop = threading.Event()
    problems: list = []
    completed_seen: set[str] = set()
    lock = threading.Lock()

    def storm(seed: int) -> None:
        rng = random.Random(seed)
        while not stop.wait(0.001):
            session_id, verb = rng.choice(ids), rng.choice(VERBS)
            if verb == "delete":
                reply = worker.delete_session(session_id=session_id)
                if reply["success"]:
                    with lock:
                        completed_seen.discard(session_id)
                    generate(worker, session_id=session_id, steps=12, seed=seed, background=True)
            else:
                reply = worker.control_session(session_id=session_id, action=verb)
            if not reply["success"] and reply["error_code"] not in ("invalid_state", "not_found"):
                problems.append(reply)
            status = worker.get_session_status(session_id=session_id)
            if status["success"]:
                if status["status"] not in ALL_STATUSES:
                    problems.append(status)
                with lock:
                    if session_id in completed_seen and status["status"] != "completed":
                        problems.append(("completed, then", status["status"], session_id))
                    if status["status"] == "completed":
                        completed_seen.add(session_id)

    threads = [threading.Thread(target=storm, args=(n,), name=f"storm-{n}") for n in range(8)]
    for thread in threads:
        thread.start()
    time.sleep(6)
    stop.set()
    for thread in threads:
        thread.join(30)
    assert not problems, problems[:5]

    for session_id in ids:  # after the storm: everything reaches a final state, nothing hangs
        if not worker.get_session_status(session_id=session_id)["success"]:
            generate(worker, session_id=session_id, steps=3, background=True)
    settle(worker, ids)
    wait_for(lambda: testing.pending_images(worker) == 0 and all(w.active_images == 0
                                                                 for w in testing.device_workers(worker)))
    for session_id in ids:
        final = worker.get_session_status(session_id=session_id)
        if final["status"] == "completed":
            assert len(final["outputs"]) == 1 and worker.get_output(final["outputs"][0]["output_id"]).shape


def test_deletes_racing_completion_leave_no_outputs_behind(model_cache, tmp_path):
    """Deletes timed at every point around completion (before, while, after the files are written):
    whatever the interleaving, a deleted session leaves no output in memory, in the store or on disk."""
    from embedded_worker import ProcessingWorker, WorkerConfig

    config = WorkerConfig(model_cache_dir=str(model_cache), state_path=str(tmp_path / "state.sqlite3"),
                          default_model="builtin:tiny-sd", scheduling={"coalesce_wait_ms": 0})
    with ProcessingWorker(config) as worker:
        for index in range(24):
            session_id = f"racer-{index}"
            assert generate(worker, session_id=session_id, steps=2 + index % 3, background=True)["success"]
            # the delete lands anywhere from the first step to after completion, as the machine's pace decides
            wait_for(lambda: worker.get_session_status(session_id)["progress"] >= 25 * (index % 4))
            assert worker.delete_session(session_id=session_id)["success"]
        wait_for(lambda: testing.pending_images(worker) == 0 and not testing.device_workers(worker)[0].active_images)
        testing.drain(worker)  # what the CPU pool and the loop had queued before this has been applied
        assert testing.output_store(worker).count() == 0
        assert testing.state_store(worker).stored_outputs() == 0
    assert not [p for p in (tmp_path / "outputs").rglob("*") if p.is_file()]
    assert not [p for p in (tmp_path / "pixels").rglob("*") if p.is_file()]


def burn_cpu(stop: threading.Event) -> None:
    """A CPU-heavy neighbour in the same process: pure Python, so it fights the device thread for the GIL."""
    while not stop.is_set():
        sum(i * i for i in range(20_000))


@contextlib.contextmanager
def cpu_burner(kind: str) -> Iterator[None]:
    """A CPU-heavy neighbour for the length of the storm: a thread of this process (it takes the GIL from the
    loop and the device thread), or a second process on both cores (it takes the CPU; the defect showed there)."""
    if kind == "thread":
        stop = threading.Event()
        burner = threading.Thread(target=burn_cpu, args=(stop,), name="burner")
        burner.start()
        try:
            yield
        finally:
            stop.set()
            burner.join(30)
        return
    code = "while True: sum(i * i for i in range(20_000))"
    burners = [subprocess.Popen([sys.executable, "-c", code]) for _ in range(2)]
    try:
        yield
    finally:
        for burner in burners:
            burner.kill()
            burner.wait(30)


def mixed_storm(worker, seed: int, burner: str = "thread", seconds: float = 4.0) -> None:
    """3 batches of 4 items and 3 sessions; 6 threads fire pause / resume / cancel / restart / retry at random
    beside a CPU-heavy neighbour, then everything left paused is resumed: every record ends final within a
    bound, the device goes idle (nothing of a cancelled or replaced run is left there), completed work holds
    its outputs and cancelled work none."""
    sessions, batches = [f"ms{seed}-s{i}" for i in range(3)], [f"mb{seed}-b{i}" for i in range(3)]
    for index, session_id in enumerate(sessions):
        assert generate(worker, session_id=session_id, steps=10, seed=index, background=True)["success"]
    for index, batch_id in enumerate(batches):
        reply = worker.execute_batch(batch_id=batch_id, workflow_id="img-generation-basic",
                                     parameters={"prompt": "p", "steps": 8, "seed": 100 * index, "total_images": 4})
        assert reply["success"], reply
    stop, problems = threading.Event(), []

    def fire(thread_seed: int) -> None:
        rng = random.Random(thread_seed)
        while not stop.wait(0.002):
            if rng.random() < 0.5:
                reply = worker.control_session(session_id=rng.choice(sessions),
                                               action=rng.choice(("pause", "resume", "cancel", "restart")))
            else:
                reply = worker.control_batch(batch_id=rng.choice(batches),
                                             action=rng.choice(("pause", "resume", "cancel", "retry")))
            if not reply["success"] and reply["error_code"] != "invalid_state":
                problems.append(reply)

    def batch_final(batch_id: str) -> bool:
        status = worker.get_batch_status(batch_id=batch_id)
        if status["status"] == "paused" or status.get("counts", {}).get("paused"):
            worker.control_batch(batch_id=batch_id, action="resume")
        return status["status"] in ("completed", "failed", "cancelled")

    threads = [threading.Thread(target=fire, args=(1000 * seed + n,), name=f"fire-{n}") for n in range(6)]
    with cpu_burner(burner):  # through the storm and the settling after it
        for thread in threads:
            thread.start()
        try:
            stop.wait(seconds)
        finally:
            stop.set()
            for thread in threads:
                thread.join(30)
        assert not problems, problems[:3]
        settle(worker, sessions)
        wait_for(lambda: all([batch_final(b) for b in batches]), timeout=120, interval=0.05)
        wait_for(lambda: testing.pending_images(worker) == 0 and all(w.active_images == 0
                                                                     for w in testing.device_workers(worker)),
                 timeout=60)
    for session_id in sessions:
        final = worker.get_session_status(session_id=session_id)
        assert len(final["outputs"]) == (1 if final["status"] == "completed" else 0), final
    for batch_id in batches:
        final = worker.get_batch_status(batch_id=batch_id, include_items=True)
        for item in final["items"]:
            assert len(item["outputs"]) == (1 if item["status"] == "completed" else 0), item


@pytest.mark.parametrize(("seed", "burner"), [(0, "thread"), (1, "process")])
def test_a_mixed_storm_over_batches_and_sessions_settles_with_a_cpu_burner_beside_it(make_worker, seed, burner):
    mixed_storm(make_worker(scheduling={"coalesce_wait_ms": 2}), seed=seed, burner=burner)


@pytest.mark.soak
@pytest.mark.parametrize("burner", ["thread", "process"])
@pytest.mark.parametrize("seed", range(2, 22))
def test_more_mixed_storms_settle(make_worker, seed, burner):
    mixed_storm(make_worker(scheduling={"coalesce_wait_ms": 2}), seed=seed, burner=burner)
