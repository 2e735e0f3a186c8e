"""However the host ends, the interpreter exits cleanly: with or without close(), or after a refused one.

A worker still open at exit is closed by the library (its unfinished work suspended, as a plain close()
would), so its device thread is not inside torch when the interpreter finalizes: that used to abort the
process ("terminate called without an active exception", exit code 134).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent


def exit_run(model_cache: Path, state_path: Path, how: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tests.helpers.exit_worker", str(model_cache), str(state_path),
                           how], capture_output=True, text=True, timeout=300, cwd=ROOT)


@pytest.mark.parametrize("how", ["no-close", "refused-close", "close"])
def test_the_process_exits_cleanly_and_keeps_the_unfinished_work(model_cache, tmp_path, make_worker, how):
    state_path = tmp_path / "state.sqlite3"
    done = exit_run(model_cache, state_path, how)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "terminate called" not in done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["forwards"] >= 2  # the device was stepping when the host ended
    # the session was suspended, not lost: the next start on the same state file has it, unfinished
    restarted = make_worker(state_path=str(state_path))
    assert restarted.get_session_status(session_id="long")["status"] in ("pending", "running")


def test_two_hosts_that_end_mid_step_leave_the_session_resumable_not_quarantined(model_cache, tmp_path,
                                                                                  make_worker):
    """A close at exit (or any close) takes the images off the device in the store as well: a start that
    finds a record still marked on the device takes its process for killed by it, and two such starts
    quarantined a session that had only been suspended twice."""
    state_path = tmp_path / "state.sqlite3"
    for how in ("no-close", "close"):
        assert exit_run(model_cache, state_path, how).returncode == 0
    restarted = make_worker(state_path=str(state_path))
    assert restarted.get_session_status(session_id="long")["status"] in ("pending", "running")
