"""A host's start waits for no heavy import: importing embedded_worker and making the worker import
neither torch nor diffusers nor transformers (seconds: 3.1 of a 3.4 s cold start in the .NET host).
The device side imports them on its own start thread; work submitted meanwhile queues and runs.

Each case runs in a fresh process (tests.helpers.held_start) whose device start is held before its
first import, so what the start imported is counted, not raced.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent


def held_start(model_cache: Path, how: str) -> dict:
    done = subprocess.run([sys.executable, "-m", "tests.helpers.held_start", str(model_cache), how],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_start_imports_no_torch_and_work_sent_meanwhile_queues_then_runs(model_cache):
    report = held_start(model_cache, "queue")
    assert report["imported"] == []
    assert report["device_status"]["success"] and report["device_status"]["starting"] is True
    assert report["device_status"]["workers"] == []
    assert report["submitted"] and report["before"] == "pending"
    assert report["after"] == "completed"


def test_a_close_while_the_devices_start_ends_the_start(model_cache):
    report = held_start(model_cache, "close")
    assert report["imported"] == []
    assert report["close"]["success"], report["close"]
    assert report["workers"] == 0  # closed before the start made them: none was made


def test_devices_that_cannot_start_fail_the_work_sent_and_say_why(make_worker, monkeypatch):
    """Whether the work came before or after the start failed, it ends with the reason, never queued for ever."""
    from embedded_worker.diffusion import offline

    def broken() -> None:
        raise RuntimeError("no device library here")

    monkeypatch.setattr(offline, "quiet_libraries", broken)
    worker = make_worker()
    reply = worker.execute_workflow(workflow_id="img-generation-basic", background=False,
                                    parameters={"prompt": "never drawn", "steps": 2, "seed": 1})
    assert (reply["status"], reply["error_code"]) == ("failed", "unavailable"), reply
    assert "the devices could not start" in reply["error"] and "no device library here" in reply["error"], reply
    status = worker.execute("device.get_status", {})
    assert "no device library here" in status["start_error"] and "starting" not in status
    loading = worker.execute("model.load_model", {"model_id": "builtin:tiny-sd"})
    assert loading["error_code"] == "unavailable" and "could not start" in loading["error"], loading
