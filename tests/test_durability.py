"""Durable state: what a worker stored is there after a restart, and unfinished work resumes."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np
import pytest

from embedded_worker import ProcessingWorker, WorkerConfig
from embedded_worker.errors import Unavailable

from .conftest import generate, session_status, wait_for


@pytest.fixture
def durable(model_cache, tmp_path):
    """Workers on one state file, opened one after another like successive processes."""
    made: list[ProcessingWorker] = []

    def open_worker(**overrides) -> ProcessingWorker:
        settings = {"model_cache_dir": str(model_cache), "state_path": str(tmp_path / "state" / "state.sqlite3"),
                    **overrides}
        worker = ProcessingWorker(WorkerConfig.model_validate(settings))
        made.append(worker)
        return worker

    yield open_worker
    for worker in made:
        worker.close(timeout=30)


def test_completed_work_and_its_pixels_survive_a_restart(durable, tmp_path):
    first = durable()
    reply = generate(first, session_id="kept", seed=77, background=False)
    output = reply["outputs"][0]
    pixels = np.array(first.get_output(output["output_id"]))
    png = Path(output["path"])
    assert png.is_file() and png.parent == tmp_path / "state" / "outputs" / "kept"  # synced before completion
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
