"""Kill -9 mid-batch, then restart: completed items intact, interrupted ones finished, none twice;
and an item that kills the process on two starts is quarantined instead of killing the third."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from embedded_worker import ProcessingWorker, WorkerConfig

from .conftest import assert_same_up_to_batch_rounding, wait_for

pytestmark = pytest.mark.own_processes
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


@pytest.mark.parametrize("loss", ["intact", "deleted", "garbled"])
def test_a_log_lost_after_kill_nine_is_reported_and_unowned_files_are_swept(model_cache, tmp_path, loss):
    """The state file's write-ahead log holds what the killed process stored since its last checkpoint:
    deleted or garbled, that is lost; the next start says so, and removes the raw pixels no row owns."""
    config = WorkerConfig(model_cache_dir=model_cache, state_path=str(tmp_path / "state.sqlite3"))
    with ProcessingWorker(config) as first:  # closed: its work is in the database file itself
        kept = first.execute_workflow(session_id="kept", workflow_id="img-generation-basic", background=False,
                                      parameters={"prompt": "calm", "seed": 1, "steps": 4})["outputs"][0]
    crashing = start(tmp_path, model_cache, "crashy", 8)
    lines_until(crashing, done=2)
    os.kill(crashing.pid, signal.SIGKILL)
    crashing.wait(timeout=30)
    wal = tmp_path / "state.sqlite3-wal"
    if loss == "deleted":
        wal.unlink()
    elif loss == "garbled":
        garbled = bytearray(wal.read_bytes())
        frame = 24 + 4096  # the second frame's page on: SQLite reads no frame after a bad checksum
        garbled[32 + frame + 24:32 + frame + 88] = b"\xaa" * 64
        wal.write_bytes(bytes(garbled))
    written_images = len(list((tmp_path / "outputs").rglob("out_*.png")))

    with ProcessingWorker(config) as again:
        status = again.get_status()
        journal_loss = status["state"]["journal_loss"]
        assert status["recovery"]["journal_loss"] == journal_loss
        raw_files = sorted((tmp_path / "pixels").rglob("out_*.npy"))
        if loss == "intact":
            assert journal_loss is None
            assert again.get_batch_status(batch_id="crashy")["success"]
        else:
            assert journal_loss and "ended without closing" in journal_loss
            assert ("is missing" if loss == "deleted" else "is damaged") in journal_loss
            assert status["recovery"]["swept_files"] >= 2
            assert status["recovery"]["unowned_image_files"] == written_images - 1  # the user's files stay
            assert [p.name for p in raw_files] == [f"{kept['output_id']}.npy"]
        if loss == "deleted":
            assert again.get_batch_status(batch_id="crashy")["error_code"] == "not_found"
        assert again.get_session_status(session_id="kept")["outputs"] == [kept]
        assert again.get_output(kept["output_id"]).shape[2] == 3
        checkpoints = tmp_path / "state.sqlite3.checkpoints"  # the resumed batch's own may be mid-write now
        assert not [p for p in tmp_path.rglob("*.partial") if not p.is_relative_to(checkpoints)]


def stored_checkpoints(state_dir: Path) -> dict[str, int]:
    """Record id -> step of each checkpoint row, read beside the running process (SQLite lets a reader in)."""
    database = sqlite3.connect(f"file:{state_dir / 'state.sqlite3'}?mode=ro", uri=True)
    try:
        return dict(database.execute("SELECT record_id, step FROM checkpoints").fetchall())
    except sqlite3.OperationalError:  # not made yet
        return {}
    finally:
        database.close()


def test_kill_nine_with_checkpoints_recomputes_at_most_the_interval_and_keeps_the_pixels(model_cache, tmp_path):
    """Images checkpointed every 3 steps; the process is killed at step 4 of the images in flight, after their
    step-3 checkpoint was written: they continue at step 3 (one step computed twice, of at most 3), every item
    completes once, with the pixels of an uninterrupted run (within batch rounding: resumed images run in
    cohorts of their own)."""
    every = 3
    first = start(tmp_path, model_cache, "ckpt", 6, "--every-steps", str(every), "--trace-steps",
                  "--hold-at-step", str(every + 1))
    lines = []
    for line in first.stdout:
        lines.append(json.loads(line))
        if "held" in lines[-1]:
            break
    reached: dict[str, int] = {}
    for message in lines:
        if "forward" in message:
            reached[message["forward"]] = max(reached.get(message["forward"], 0), message["step"])
    in_flight = {record for record, step in reached.items() if step == every + 1}
    assert in_flight
    wait_for(lambda: all(stored_checkpoints(tmp_path).get(r) == every for r in in_flight), timeout=60)
    os.kill(first.pid, signal.SIGKILL)
    first.wait(timeout=30)
    done_before = {m["item"] for m in lines if "item" in m}

    second = start(tmp_path, model_cache, "ckpt", 6, "--trace-steps")
    after = lines_until(second, done=10**6)
    assert second.wait(timeout=300) == 0
    final = after[-1]["final"]
    assert final["status"] == "completed" and final["processed_items"] == 6
    assert sorted(o["seed"] for o in final["outputs"]) == list(range(500, 506))  # each once
    first_forward: dict[str, int] = {}
    for message in after:
        if "forward" in message:
            first_forward.setdefault(message["forward"], message["step"])
    for record in in_flight:
        assert first_forward[record] == every + 1  # continued at its checkpoint: step 4 is computed again
        assert reached[record] - every <= every  # computed twice: at most the interval
    items = {i["item_id"]: i for i in final["items"]}
    for record in in_flight:
        assert items[record.split("/", 1)[1]]["resumed_from_step"] == every
    counted = after[-1]["checkpoints"]  # the worker's own count: steps saved, and the bound on those redone
    assert counted["resumed_images"] == len(in_flight) and counted["steps_restored"] == every * len(in_flight)
    recomputed = sum(reached[record] - every for record in in_flight)  # from the traces of both processes
    assert recomputed <= counted["steps_recomputed_at_most"] == every * len(in_flight)
    assert not any(f"ckpt/{item}" in first_forward for item in done_before)  # finished work is not redone
    config = WorkerConfig(model_cache_dir=model_cache, state_path=str(tmp_path / "state.sqlite3"))
    with ProcessingWorker(config) as reopened:
        for record in in_flight:
            item = items[record.split("/", 1)[1]]
            solo = reopened.execute_workflow(workflow_id="img-generation-basic", background=False,
                                             parameters={"prompt": "calm", "seed": item["seed"], "steps": 8})
            assert_same_up_to_batch_rounding(reopened.get_output(item["outputs"][0]["output_id"]),
                                             reopened.get_output(solo["outputs"][0]["output_id"]))
