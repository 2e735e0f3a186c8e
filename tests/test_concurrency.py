"""Eight threads calling status and control while work runs: envelopes always, states always legal, and
nothing left stuck once the storm ends (`make soak` runs 20 more storms, each with other choices)."""

from __future__ import annotations

import random
import threading

import pytest

from embedded_worker.lifecycle.state import ALL_STATUSES

from .conftest import generate, session_status, settle, wait_for


def test_eight_threads_of_status_and_control_while_sessions_run(worker):
    storm(worker, rounds_seed=0)


@pytest.mark.soak
@pytest.mark.parametrize("rounds_seed", range(1, 21))
def test_more_control_storms_leave_nothing_stuck(worker, rounds_seed):
    """One storm in 15 left a session pending for ever before two lifecycle races were fixed (test_jobs)."""
    storm(worker, rounds_seed)


def storm(worker, rounds_seed: int) -> None:
    ids = [f"c{i}" for i in range(6)]
    for index, session_id in enumerate(ids):
        assert generate(worker, session_id=session_id, steps=30, seed=index, background=True)["success"]
    stop = threading.Event()
    problems: list[str] = []
    seen: dict[str, set] = {s: set() for s in ids}

    def hammer(seed: int) -> None:
        rng = random.Random(seed + 1000 * rounds_seed)
        # ~2,000 calls/s per thread: tight loops of pure-Python callers starve the device thread of the GIL
        # (every torch op gives it up and must win it back); hosts poll the board instead
        while not stop.wait(0.0005):
            session_id = rng.choice(ids)
            if rng.random() < 0.8:
                reply = worker.get_session_status(session_id=session_id)
                if not reply["success"] or reply["status"] not in ALL_STATUSES or not 0 <= reply["progress"] <= 100:
                    problems.append(repr(reply))
                seen[session_id].add(reply.get("status"))
            else:
                reply = worker.control_session(session_id=session_id, action=rng.choice(["pause", "resume"]))
                if not reply["success"] and reply.get("error_code") != "invalid_state":
                    problems.append(repr(reply))

    threads = [threading.Thread(target=hammer, args=(n,), name=f"hammer-{n}") for n in range(8)]
    for thread in threads:
        thread.start()
    try:
        wait_for(lambda: sum(session_status(worker, s)["status"] == "completed" for s in ids) >= 2, timeout=120)
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
    assert not problems, problems[:3]
    for session_id, final in settle(worker, ids).items():  # whatever the storm left paused must finish
        assert final["status"] == "completed" and len(final["outputs"]) == 1, final
        assert worker.control_session(session_id=session_id, action="pause")["error_code"] == "invalid_state"
    assert any("paused" in statuses for statuses in seen.values())
