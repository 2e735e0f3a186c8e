"""A storm of pause/resume/cancel/restart/delete from eight threads against the same sessions."""

from __future__ import annotations

import random
import threading
import time

from embedded_worker.state import ALL_STATUSES

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
    pool = worker._engine.pool
    wait_for(lambda: pool.pending() == 0 and all(w.active_images == 0 for w in pool.workers))
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
        engine = worker._engine
        wait_for(lambda: engine.pool.status()["queued_images"] == 0 and not engine.pool.workers[0].active_images)
        engine.cpu.submit(lambda: None).result(timeout=60)  # continuations queued before this have run
        assert engine.outputs.count() == 0
        rows = engine.store._db.execute("SELECT COUNT(*) FROM outputs").fetchone()[0]
        assert rows == 0
    assert not [p for p in (tmp_path / "outputs").rglob("*") if p.is_file()]
    assert not [p for p in (tmp_path / "pixels").rglob("*") if p.is_file()]
