"""Kill -9 mid-batch, then restart: completed items intact, interrupted ones finished, none twice;
and an item that kills the process on two starts is quarantined instead of killing the third."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from embedded_worker import ProcessingWorker, WorkerConfig

from .conftest import assert_same_up_to_batch_rounding

ROOT = Path(__file__).resolve().parents[1]


def start(state_dir: Path, model_cache: Path, batch_id: str, count: int, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tests.helpers.crash_worker", str(state_dir), str(model_cache),
                             batch_id, str(count), *extra], cwd=ROOT, stdout=subprocess.PIPE, text=True)


def lines_until(process: subprocess.Popen, done: int) -> list[dict]:
    seen = []
    for line in process.stdout:
        message = json.loads(line)
        seen.append(message)
        if "final" in message or sum("item" in m for m in seen) >= done:
            break
    return seen


def test_kill_nine_mid_batch_then_restart_loses_and_repeats_nothing(model_cache, tmp_path):
    first = start(tmp_path, model_cache, "crashy", 12)
    before = lines_until(first, done=4)
    os.kill(first.pid, signal.SIGKILL)
    first.wait(timeout=30)
    assert first.returncode == -signal.SIGKILL
    completed_before = {m["item"]: m for m in before if "item" in m}
    assert len(completed_before) >= 4

    second = start(tmp_path, model_cache, "crashy", 12)
    after = lines_until(second, done=10**6)
    assert second.wait(timeout=300) == 0
    final = after[-1]["final"]
    assert final["status"] == "completed" and final["processed_items"] == 12
    outputs = final["outputs"]
    assert sorted(o["seed"] for o in outputs) == list(range(500, 512))
    assert len({o["item_id"] for o in outputs}) == 12 and len(outputs) == 12  # none lost, none twice
    reported = {m["item"]: m for m in after if "item" in m}
    for item, message in completed_before.items():  # the same output, the same pixels, not redone
        assert reported[item]["output_id"] == message["output_id"]
        assert reported[item]["sha256"] == message["sha256"]
    interrupted = [i for i in final["items"] if i["item_id"] not in completed_before]
    assert interrupted and all(i["status"] == "completed" for i in interrupted)

    config = WorkerConfig(model_cache_dir=model_cache, state_path=str(tmp_path / "state.sqlite3"))
    with ProcessingWorker(config) as reopened:  # a third start: everything is there, and right
        stored = {o["seed"]: reopened.get_output(o["output_id"]) for o in reopened.get_batch_status(
            batch_id="crashy")["outputs"]}
        for seed in (500, 503, 511):
            solo = reopened.execute_workflow(workflow_id="img-generation-basic", background=False,
                                             parameters={"prompt": "calm", "seed": seed, "steps": 8})
            assert_same_up_to_batch_rounding(stored[seed], reopened.get_output(solo["outputs"][0]["output_id"]))


def test_an_item_that_kills_the_process_twice_is_quarantined(model_cache, tmp_path):
    for attempt in (1, 2):
        crashing = start(tmp_path, model_cache, "poisoned", 6, "--poison", "poison")
        crashing.communicate(timeout=300)
        assert crashing.returncode == 9, f"start {attempt} should have died on the poisoned item"
    survivor = start(tmp_path, model_cache, "poisoned", 6, "--poison", "poison")
    out, _ = survivor.communicate(timeout=300)
    assert survivor.returncode == 0
    final = json.loads(out.strip().splitlines()[-1])["final"]
    assert final["status"] == "failed" and final["processed_items"] == 5 and final["failed_items"] == 1
    [poisoned] = [i for i in final["items"] if i["status"] == "failed"]
    assert poisoned["item_id"] == "item-03"
    assert "quarantined" in poisoned["error"] and "on the device, on 2 consecutive starts" in poisoned["error"]
    assert sorted(o["seed"] for o in final["outputs"]) == [500, 501, 502, 504, 505]
