"""Durable state: what a worker stored is there after a restart, and unfinished work resumes."""

from __future__ import annotations

import json
import sqlite3
import threading
from pathlib import Path

import numpy as np
import pytest

from embedded_worker import ProcessingWorker, WorkerConfig, testing
from embedded_worker.errors import Unavailable
from embedded_worker.lifecycle.store import FORMAT_VERSION
from embedded_worker.outputs.store import owner_folder

from .conftest import generate, session_status, wait_for


def test_completed_work_and_its_pixels_survive_a_restart(durable, tmp_path):
    first = durable()
    reply = generate(first, session_id="kept", seed=77, background=False)
    output = reply["outputs"][0]
    pixels = np.array(first.get_output(output["output_id"]))
    png = Path(output["path"])
    assert png.is_file() and png.parent == tmp_path / "state" / "outputs" / owner_folder("kept")  # synced first
    first.close(timeout=30)

    second = durable()
    status = session_status(second, "kept")
    assert status["status"] == "completed" and status["outputs"] == reply["outputs"]
    mapped = second.get_output(output["output_id"])
    assert np.array_equal(mapped, pixels)
    assert isinstance(mapped, np.memmap) and not mapped.flags["WRITEABLE"] and mapped.flags["C_CONTIGUOUS"]
    assert second.output_info(output["output_id"])["metadata"]["seed"] == 77
    again = generate(second, session_id="kept", seed=1, background=False)  # same id: the stored session
    assert again["duplicate"] and again["outputs"] == reply["outputs"]


def test_suspended_work_resumes_at_the_next_start_with_the_same_pixels(durable):
    first = durable()
    expected = first.get_output(generate(first, session_id="reference", seed=5, steps=30,
                                         background=False)["outputs"][0]["output_id"])
    expected = np.array(expected)
    generate(first, session_id="interrupted", seed=5, steps=30, background=True)
    batch = first.execute_batch(batch_id="half", workflow_id="img-generation-basic",
                                parameters={"seed": 40, "steps": 10, "total_images": 6},
                                configuration={"max_batch_size": 2})
    assert batch["success"]
    wait_for(lambda: first.get_batch_status(batch_id="half")["processed_items"] >= 2)
    assert first.close(timeout=30, pending="suspend")["threads_stopped"]

    second = durable()
    report = second.get_status()["processing"]
    assert report["sessions"]["total"] >= 2
    wait_for(lambda: session_status(second, "interrupted")["status"] == "completed", timeout=120)
    resumed = second.get_output(session_status(second, "interrupted")["outputs"][0]["output_id"])
    assert np.array_equal(resumed, expected)
    wait_for(lambda: second.get_batch_status(batch_id="half")["status"] == "completed", timeout=120)
    final = second.get_batch_status(batch_id="half", include_items=True)
    assert sorted(o["seed"] for o in final["outputs"]) == list(range(40, 46))
    assert len({o["item_id"] for o in final["outputs"]}) == 6  # none twice


def test_work_suspended_by_many_clean_closes_is_never_quarantined(durable):
    """Seven deploys in a row, each a clean suspending close: the session is resumed by each start and is
    never taken for what ends the process (each start used to count toward the 5-start restart limit)."""
    first = durable()
    generate(first, session_id="deployed", seed=3, steps=150, background=True)
    assert first.close(timeout=30, pending="suspend")["threads_stopped"]
    for _ in range(7):
        worker = durable()
        assert session_status(worker, "deployed")["status"] in ("pending", "running")
        assert worker.close(timeout=30, pending="suspend")["threads_stopped"]
    assert session_status(durable(), "deployed")["status"] in ("pending", "running")


def test_close_can_cancel_unfinished_work_instead(durable):
    first = durable()
    generate(first, session_id="dropped", steps=150, background=True)
    first.close(timeout=30, pending="cancel")
    assert session_status(durable(), "dropped")["status"] == "cancelled"


def test_recovery_fail_policy_fails_unfinished_work_with_the_reason(durable):
    first = durable()
    generate(first, session_id="unfinished", steps=150, background=True)
    wait_for(lambda: session_status(first, "unfinished")["status"] == "running")
    first.close(timeout=30, pending="suspend")
    second = durable(recovery="fail")
    status = session_status(second, "unfinished")
    assert status["status"] == "failed" and "restarted before this session finished" in status["error"]


def test_paused_work_stays_paused_across_a_restart_until_resumed(durable):
    first = durable()
    generate(first, session_id="held", steps=150, background=True)
    wait_for(lambda: session_status(first, "held")["status"] == "running")
    assert first.control_session(session_id="held", action="pause")["status"] == "paused"
    first.close(timeout=30)
    second = durable()
    assert session_status(second, "held")["status"] == "paused"
    assert second.control_session(session_id="held", action="resume")["success"]
    wait_for(lambda: session_status(second, "held")["status"] == "completed", timeout=120)


def test_a_second_worker_on_the_same_state_file_is_refused(durable):
    durable()
    with pytest.raises(Unavailable, match="in use by another worker process"):
        durable()


def test_every_state_change_is_on_disk_before_it_is_reported(durable, tmp_path):
    worker = durable()
    reply = generate(worker, session_id="watched", background=False)
    row = sqlite3.connect(tmp_path / "state" / "state.sqlite3").execute(
        "SELECT status FROM records WHERE id = 'watched'").fetchone()
    assert row == ("completed",) and reply["status"] == "completed"
    assert Path(reply["outputs"][0]["path"]).stat().st_size > 0


def test_retention_prunes_the_oldest_finished_work_and_its_files(durable):
    worker = durable(retention={"max_finished": 3, "max_age_hours": 1})
    replies = [generate(worker, session_id=f"r{i}", seed=i, background=False) for i in range(5)]
    gone = lambda r: worker.get_session_status(session_id=r["session_id"])["success"] is False  # noqa: E731
    wait_for(lambda: all(gone(r) for r in replies[:2]))  # pruned as soon as the count was exceeded
    assert [session_status(worker, f"r{i}")["status"] for i in (2, 3, 4)] == ["completed"] * 3
    for old in replies[:2]:
        assert worker.get_session_status(session_id=old["session_id"])["error_code"] == "not_found"
        assert not Path(old["outputs"][0]["path"]).exists()
        assert worker.get_output(old["outputs"][0]["output_id"])["error_code"] == "not_found"


def test_close_arguments_are_checked(durable):
    worker = durable()
    assert worker.close(pending="later")["error_code"] == "invalid_request"
    assert worker.close(timeout=-1)["error_code"] == "invalid_request"
    assert worker.close(timeout=5, pending="finish")["success"]


def test_retention_by_age_prunes_at_start(durable):
    first = durable(retention={"max_finished": 100, "max_age_hours": 0.0002})  # 0.72 s
    old = generate(first, session_id="aged", background=False)
    first.close(timeout=30)
    import time

    time.sleep(1.0)
    second = durable(retention={"max_finished": 100, "max_age_hours": 0.0002})
    assert second.get_session_status(session_id="aged")["error_code"] == "not_found"
    assert not Path(old["outputs"][0]["path"]).exists()


@pytest.mark.parametrize(("timeout", "pending"), [(1, "finish"), (0, "suspend"), (0, "cancel")])
def test_close_always_stops_the_device_threads_and_the_process_exits_cleanly(model_cache, timeout, pending):
    """close() during a 150-step, 4-image session, in a process of its own: every worker thread has
    ended when it returns, it says so, a second close says the same, and the interpreter exits with 0
    (a device thread that outlived close() aborts it with 134)."""
    import json
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "tests.helpers.close_worker", str(model_cache), str(timeout),
                           pending], capture_output=True, text=True, timeout=300, cwd=Path(__file__).parent.parent)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["close"] == {"success": True, "closed": True, "threads_stopped": True}
    assert report["alive"] == []
    assert report["again"]["threads_stopped"] is True


@pytest.mark.parametrize("timeout", [float("nan"), float("inf"), True, "5", None])
def test_close_refuses_a_timeout_that_is_not_a_finite_number_and_stays_usable(durable, timeout):
    worker = durable()
    reply = worker.close(timeout=timeout)
    assert reply["error_code"] == "invalid_request" and "timeout" in reply["error"]
    assert generate(worker, background=False)["status"] == "completed"


def test_callers_waiting_for_work_get_an_answer_when_close_suspends_it(durable):
    """A `background: false` caller blocks until its work is final; a close that suspends the work
    first answers it with `unavailable`, and the work is there at the next start."""
    import threading

    worker = durable()
    replies: list[dict] = []
    caller = threading.Thread(target=lambda: replies.append(
        generate(worker, session_id="waited", steps=150, num_images=4, background=False)))
    caller.start()
    wait_for(lambda: worker.get_session_status("waited").get("status") == "running")
    assert worker.close(timeout=0)["threads_stopped"] is True
    caller.join(timeout=60)
    assert not caller.is_alive()
    [reply] = replies
    assert reply["success"] is False and reply["error_code"] == "unavailable"
    assert "suspended" in reply["error"]
    assert session_status(durable(), "waited")["status"] in ("pending", "running")


def test_ids_shared_across_kinds_are_refused_and_the_store_stays_openable(durable):
    """Sessions, batches and items share one namespace of ids: a colliding id is refused with the
    record that has it, and nothing a request does makes the next start fail."""
    worker = durable()
    assert worker.execute_batch(batch_id="B", workflow_id="img-generation-basic", background=False,
                                parameters={"total_images": 1, "steps": 2, "prompt": "b"})["status"] == "completed"
    as_item = generate(worker, session_id="B/item-0000", background=False)
    assert as_item["error_code"] == "invalid_request" and "Item 'item-0000' of batch 'B'" in as_item["error"]
    as_batch = generate(worker, session_id="B", background=False)
    assert as_batch["error_code"] == "invalid_request" and "Batch 'B'" in as_batch["error"]
    assert generate(worker, session_id="X", background=False)["status"] == "completed"
    reply = worker.execute_batch(batch_id="X", workflow_id="img-generation-basic", parameters={"total_images": 1})
    assert reply["error_code"] == "invalid_request" and "Session 'X'" in reply["error"]
    reply = worker.execute_batch(batch_id="X", workflow_id="img-generation-basic",
                                 items=[{"item_id": "y", "parameters": {}}])
    assert reply["error_code"] == "invalid_request"
    worker.close(timeout=30)
    again = durable()
    assert session_status(again, "X")["status"] == "completed"
    assert again.get_batch_status(batch_id="B")["status"] == "completed"
    assert again.delete_session(session_id="X")["success"]
    batch = again.get_batch_status(batch_id="B")
    assert batch["outputs"] and again.get_output(batch["outputs"][0]["output_id"]).shape[2] == 3


def test_unreadable_rows_are_quarantined_and_the_worker_starts(durable, tmp_path):
    worker = durable()
    generate(worker, session_id="good", background=False)
    worker.close(timeout=30)
    database = sqlite3.connect(tmp_path / "state" / "state.sqlite3")
    database.execute("INSERT INTO records VALUES ('garbled', 'session', 'pending', NULL, '{not json')")
    database.execute("INSERT INTO records VALUES ('newer', 'session', 'pending', NULL, ?)",
                     ('{"id": "newer", "field_from_the_future": 1}',))
    database.execute("INSERT INTO records VALUES ('alien', 'spaceship', 'pending', NULL, '{}')")
    database.commit()
    database.close()
    again = durable()
    assert session_status(again, "good")["status"] == "completed"
    quarantined = again.get_status()["state"]["quarantined_rows"]
    assert sorted(row["id"] for row in quarantined) == ["alien", "garbled", "newer"]
    assert all(row["reason"] for row in quarantined)
    assert generate(again, session_id="garbled", background=False)["status"] == "completed"
    again.close(timeout=30)
    assert len(durable().get_status()["state"]["quarantined_rows"]) == 3  # kept, not quarantined twice


def test_a_failed_start_says_why_and_releases_the_state_file(durable, tmp_path):
    state = tmp_path / "state" / "state.sqlite3"
    state.parent.mkdir(parents=True)
    state.write_bytes(b"this is not a database, " * 100)
    with pytest.raises(Unavailable, match="cannot be opened"):
        durable()
    state.unlink()
    assert generate(durable(), background=False)["status"] == "completed"  # not "in use by another worker"


def test_damaged_raw_pixels_are_an_envelope_with_the_reason(durable, tmp_path):
    worker = durable()
    output = generate(worker, background=False)["outputs"][0]
    worker.close(timeout=30)
    [raw] = (tmp_path / "state" / "pixels").rglob(f"{output['output_id']}.npy")
    raw.write_bytes(b"\x93NUMPY garbage")
    again = durable()
    for reply in (again.get_output(output["output_id"]), again.output_info(output["output_id"])):
        assert reply["success"] is False and reply["error_code"] == "unavailable"
        assert "cannot be read from disk" in reply["error"]


def test_work_restored_failed_or_finished_can_be_restarted_retried_and_deleted(durable):
    """A record a new process restores without a run (failed by recovery, or finished before) is a job
    all the same: restart and retry plan its stored request again, delete forgets it."""
    first = durable()
    generate(first, session_id="cut", steps=150, background=True)
    first.execute_batch(batch_id="cut-batch", workflow_id="img-generation-basic", background=True,
                        parameters={"total_images": 2, "steps": 150, "prompt": "b", "seed": 3})
    wait_for(lambda: session_status(first, "cut")["status"] == "running")
    generate(first, session_id="done", steps=2, background=False)
    first.close(timeout=30, pending="suspend")

    second = durable(recovery="fail")
    assert session_status(second, "cut")["status"] == "failed"
    assert second.get_batch_status(batch_id="cut-batch")["status"] == "failed"
    restarted = second.control_session(session_id="cut", action="restart")
    assert restarted["success"] and restarted["attempt"] == 2, restarted
    assert second.control_session(session_id="done", action="restart")["error_code"] == "invalid_state"
    retried = second.control_batch(batch_id="cut-batch", action="retry")
    assert retried["success"] and retried["status"] in ("pending", "running"), retried
    assert second.control_session(session_id="cut", action="cancel")["status"] == "cancelled"
    assert second.control_batch(batch_id="cut-batch", action="cancel")["status"] == "cancelled"
    for command, key, record_id in (("delete_session", "session_id", "cut"), ("delete_session", "session_id", "done"),
                                    ("delete_batch", "batch_id", "cut-batch")):
        assert getattr(second, command)(**{key: record_id})["success"]
    assert second.get_status()["processing"]["sessions"]["total"] == 0
    assert second.get_status()["processing"]["batches"]["total"] == 0


def test_a_start_on_a_big_prune_backlog_queues_one_prune_at_a_time_and_live_work_still_runs(
        model_cache, tmp_path, monkeypatch):
    """Every final event over `max_finished` (each deletion's own included) used to queue a prune on the CPU
    pool that runs' continuations use: thousands queued at a start on a big store, and live work waited
    behind them. Now one pass waits at most; a pass held in the middle of the backlog leaves the other CPU
    thread to a live session, which completes while the backlog is still there."""
    from benchmarks.prune_bench import PruneCounter, write_finished_sessions
    from embedded_worker import engine as engine_module
    from embedded_worker.lifecycle.retention import PRUNE_CHUNK
    from embedded_worker.lifecycle.sessions import SessionService

    rows, keep = 20 * PRUNE_CHUNK, 10
    state = tmp_path / "state" / "state.sqlite3"
    state.parent.mkdir()
    write_finished_sessions(state, rows)
    counter = PruneCounter()
    monkeypatch.setattr(engine_module, "ThreadPoolExecutor", counter.pool_class())
    started, held, release = threading.Event(), threading.Event(), threading.Event()
    delete = SessionService.delete

    def held_delete(self, request):  # a pass on the pool, once the worker is up, stops here until let go
        if started.is_set() and threading.current_thread().name.startswith("ew-post") and not held.is_set():
            held.set()
            release.wait(120)
        return delete(self, request)

    monkeypatch.setattr(SessionService, "delete", held_delete)
    worker = ProcessingWorker(WorkerConfig.model_validate({
        "model_cache_dir": str(model_cache), "state_path": str(state), "default_model": "builtin:tiny-sd",
        "workflows_dir": None, "retention": {"max_finished": keep}}))
    try:
        started.set()
        assert counter.most_waiting <= 1, f"{counter.most_waiting} prune tasks waited at once at the start"
        assert held.wait(60), "no prune pass ran on the pool after the start"
        reply = generate(worker, session_id="live", steps=1, background=False)
        assert reply["status"] == "completed"
        assert len(testing.session_ids(worker)) > keep + PRUNE_CHUNK  # the backlog was there all along
        release.set()
        wait_for(lambda: len(testing.session_ids(worker)) == keep, timeout=120)
        assert "live" in testing.session_ids(worker)  # the newest stays
        assert counter.most_waiting <= 1, f"{counter.most_waiting} prune tasks waited at once"
        assert counter.queued <= rows // PRUNE_CHUNK + 5, f"{counter.queued} prune tasks for {rows} rows"
    finally:
        release.set()
        worker.close(timeout=30)


def test_a_new_state_file_is_stamped_with_its_format(durable, tmp_path):
    durable().close(timeout=30)
    database = sqlite3.connect(tmp_path / "state" / "state.sqlite3")
    assert database.execute("PRAGMA user_version").fetchone()[0] == FORMAT_VERSION == 2
    database.close()


def altered(tmp_path, *statements: str) -> None:
    database = sqlite3.connect(tmp_path / "state" / "state.sqlite3")
    for statement in statements:
        database.execute(statement)
    database.commit()
    database.close()


@pytest.mark.parametrize("change, reason", [
    ("PRAGMA user_version = 99", "has format version 99; this worker reads versions up to 2"),
    ("PRAGMA user_version = -3", "has format version -3"),
    ("ALTER TABLE outputs ADD COLUMN thumbnail TEXT", "table outputs has columns (output_id, owner_id, item_id, "
                                                      "seed, raw_path, file_path, metadata, thumbnail)"),
    ("ALTER TABLE records RENAME TO records_old", "has no table records"),
    ("DROP TABLE quarantined_records", "has no table quarantined_records"),
])
def test_a_state_file_of_another_format_is_refused_at_start_with_the_reason(durable, tmp_path, change, reason):
    """Refused before any work is accepted, instead of starting with an empty history or failing every
    piece of work at its first write; the file is left as it was, and free for the next start."""
    worker = durable()
    generate(worker, session_id="kept", background=False)
    worker.close(timeout=30)
    altered(tmp_path, change)
    before = (tmp_path / "state" / "state.sqlite3").read_bytes()
    with pytest.raises(Unavailable) as refused:
        durable()
    assert reason in str(refused.value) and "state.sqlite3" in str(refused.value)
    assert (tmp_path / "state" / "state.sqlite3").read_bytes() == before
    with pytest.raises(Unavailable, match="format|table"):  # refused again, not "in use by another worker"
        durable()


def test_a_state_file_made_before_the_format_stamp_is_migrated_and_keeps_its_history(durable, tmp_path):
    """Version 0 is the first files' format: no stamp, and no quarantine table yet."""
    worker = durable()
    reply = generate(worker, session_id="old", background=False)
    worker.close(timeout=30)
    altered(tmp_path, "PRAGMA user_version = 0", "DROP TABLE quarantined_records")
    again = durable()
    assert session_status(again, "old")["outputs"] == reply["outputs"]
    assert again.get_status()["state"]["quarantined_rows"] == []
    again.close(timeout=30)
    database = sqlite3.connect(tmp_path / "state" / "state.sqlite3")
    assert database.execute("PRAGMA user_version").fetchone()[0] == FORMAT_VERSION
    database.close()


def test_a_stored_request_naming_fields_unknown_now_still_runs_and_the_log_says_so(durable, tmp_path):
    """An earlier version stored requests with fields it dropped (`priorty`, `parameters.model_id`): they were
    accepted then, so recovery runs them, ignoring those fields with a warning, instead of failing them."""
    first = durable()
    generate(first, session_id="held", steps=150, background=True)
    wait_for(lambda: session_status(first, "held")["status"] == "running")
    assert first.control_session(session_id="held", action="pause")["status"] == "paused"
    first.close(timeout=30)
    database = sqlite3.connect(tmp_path / "state" / "state.sqlite3")
    data = json.loads(database.execute("SELECT data FROM records WHERE id = 'held'").fetchone()[0])
    data["request"]["priorty"] = 9
    data["request"]["parameters"]["model_id"] = "builtin:shapes"
    database.execute("UPDATE records SET data = ? WHERE id = 'held'", (json.dumps(data),))
    database.commit()
    database.close()
    second = durable()
    assert second.control_session(session_id="held", action="resume")["success"]
    wait_for(lambda: session_status(second, "held")["status"] == "completed", timeout=600)  # 150 steps, busy CPU
    warnings = [r["message"] for r in second.drain_logs()["records"] if r["level"] == "WARNING"]
    for field in ("priorty", "parameters.model_id"):
        assert any("Session 'held'" in m and field in m and "ignored" in m for m in warnings), (field, warnings)


def test_a_coordinations_step_results_survive_a_restart(durable):
    """A coordination that completed and one that failed before a restart: the next start still shows what
    each of their steps did (it showed no step at all: the results lived only in the run)."""
    first = durable(limits={"max_image_side": 32})
    text2img = {"domain": "inference", "operation": "text2img", "parameters": {"prompt": "x", "steps": 2, "seed": 3}}
    completed = first.execute_workflow(coordination_id="done", background=False, domains=[
        {"domain": "device", "operation": "get_memory", "parameters": {}}, text2img])
    failed = first.execute_workflow(coordination_id="broke", background=False, domains=[
        text2img, {"domain": "postprocessing", "operation": "upscale", "parameters": {"factor": 2}}])
    assert (completed["status"], failed["status"]) == ("completed", "failed"), (completed, failed)
    before = {s: session_status(first, s)["step_results"] for s in ("done", "broke")}
    assert [r["status"] for r in before["broke"]] == ["completed", "failed"]
    assert before["done"][0]["result"]["memory"] and before["done"][1]["images"] == 1
    first.close(timeout=30)

    second = durable(limits={"max_image_side": 32})
    after = {s: session_status(second, s)["step_results"] for s in ("done", "broke")}
    assert after == json.loads(json.dumps(before))
