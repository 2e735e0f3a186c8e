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
