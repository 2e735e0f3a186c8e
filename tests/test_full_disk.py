"""A full disk: work the state store cannot take is refused whole, a failed file leaves nothing behind,
and once space returns the same requests run."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from embedded_worker import ProcessingWorker, testing
from embedded_worker.outputs import files as output_files
from embedded_worker.outputs.store import owner_folder

from .conftest import generate, session_status, wait_for
from .helpers.full_disk import FullDisk


def submit_batch(worker: ProcessingWorker, batch_id: str, background: bool = True) -> dict:
    return worker.execute_batch(batch_id=batch_id, workflow_id="img-generation-basic", background=background,
                                parameters={"total_images": 2, "steps": 3, "prompt": "full", "seed": 11})


def test_submits_the_store_cannot_take_are_refused_and_leave_nothing_behind(durable):
    worker = durable(limits={"max_queued_work": 3})
    with FullDisk(testing.state_store(worker)) as disk:
        replies = [generate(worker, session_id=f"s{n}", steps=3, background=True) for n in range(4)]
        replies += [submit_batch(worker, f"b{n}") for n in range(2)]
        replies += [generate(worker, session_id="s0", steps=3, background=True)]  # a resend is refused again
        for reply in replies:
            assert reply["success"] is False and reply["error_code"] == "unavailable", reply
            assert "database or disk is full" in reply["error"] and "nothing was accepted" in reply["error"]
        assert disk.refused == len(replies)
        for n in range(4):
            assert worker.get_session_status(session_id=f"s{n}")["error_code"] == "not_found"
        assert worker.get_batch_status(batch_id="b0")["error_code"] == "not_found"
        processing = worker.get_status()["processing"]
        assert processing["sessions"]["total"] == 0 and processing["batches"]["total"] == 0
    # space returns: the same ids are new work, the queue limit counts none of the refused, and all run
    for n in range(3):
        assert generate(worker, session_id=f"s{n}", steps=3, background=True)["duplicate"] is False
    assert generate(worker, session_id="s3", steps=3, background=True)["error_code"] == "resource_exhausted"
    for n in range(3):
        wait_for(lambda n=n: session_status(worker, f"s{n}")["status"] == "completed")
    batch = submit_batch(worker, "b0", background=False)
    assert batch["status"] == "completed" and batch["duplicate"] is False and batch["processed_items"] == 2
    worker.close(timeout=30)
    again = durable()
    assert [session_status(again, f"s{n}")["status"] for n in range(3)] == ["completed"] * 3
    assert again.get_batch_status(batch_id="b0")["status"] == "completed"
    assert again.get_status()["processing"]["sessions"]["total"] == 3


def test_work_stored_before_a_later_write_failed_is_accepted_and_runs(durable):
    """The new record is on disk; the write of its next status fails: it is accepted, and it runs."""
    worker = durable()
    with FullDisk(testing.state_store(worker), writes=1, after=1):
        reply = generate(worker, session_id="stored", steps=3, background=True)
    assert reply["success"] and reply["duplicate"] is False, reply
    wait_for(lambda: session_status(worker, "stored")["status"] == "completed")
    testing.drain(worker)  # the checkpoint writer is done too: its deletes are store writes
    with FullDisk(testing.state_store(worker), writes=1, after=3):  # the batch and its two items
        reply = submit_batch(worker, "stored-batch")
    assert reply["success"], reply
    wait_for(lambda: worker.get_batch_status(batch_id="stored-batch")["status"] == "completed")


class FullFiles:
    """`open` as output_files sees it, on a disk that fills up while the files of one owner are written:
    their staging file gets a byte, then the write fails with ENOSPC."""

    def __init__(self, folder: str, suffix: str):
        self.folder, self.suffix = folder, suffix

    def __call__(self, path, mode="r", *args, **kwargs):
        handle = open(path, mode, *args, **kwargs)
        path = Path(path)
        if path.parent.name == self.folder and path.name.endswith(self.suffix + ".partial"):
            return Filling(handle)
        return handle


class Filling:
    def __init__(self, handle):
        self.handle = handle

    def write(self, data) -> int:
        self.handle.write(bytes(data)[:1])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name):
        return getattr(self.handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *_exc):
        self.handle.close()


@pytest.mark.parametrize("failing", [".npy", ".png"])
def test_an_output_the_disk_cannot_hold_fails_its_work_and_leaves_no_files(durable, tmp_path, monkeypatch, failing):
    worker = durable()
    monkeypatch.setattr(output_files, "open", FullFiles(owner_folder("doomed"), failing), raising=False)
    generate(worker, session_id="doomed", steps=3, background=True)
    fine = generate(worker, session_id="fine", steps=3, background=False)
    wait_for(lambda: session_status(worker, "doomed")["status"] in ("completed", "failed", "cancelled"))
    doomed = session_status(worker, "doomed")
    assert doomed["status"] == "failed" and "No space left on device" in doomed["error"], doomed
    assert fine["status"] == "completed" and Path(fine["outputs"][0]["path"]).is_file()
    state = tmp_path / "state"
    testing.drain(worker)  # the checkpoint writer is done too: it removes the ended work's files
    assert [p for p in state.rglob("*") if p.name.endswith(".partial")] == []
    assert [p for p in state.rglob("*") if p.is_file() and p.parent.name == owner_folder("doomed")] == []
    monkeypatch.undo()  # space returns
    restarted = worker.control_session(session_id="doomed", action="restart")
    assert restarted["success"], restarted
    wait_for(lambda: session_status(worker, "doomed")["status"] == "completed")


def test_work_running_when_the_disk_fills_ends_and_is_stored_once_space_returns(durable):
    """Its status changes are kept in memory while the disk refuses them (raising into the threads that
    run it left it `running` for ever), and stored, in order, with the first write that succeeds."""
    worker = durable()
    store = testing.state_store(worker)
    generate(worker, session_id="caught", steps=6, background=True)
    worker.execute_batch(batch_id="caught-batch", workflow_id="img-generation-basic", background=True,
                         parameters={"total_images": 3, "steps": 6, "prompt": "b"})
    with FullDisk(store) as disk:
        finals = ("completed", "failed", "cancelled")
        wait_for(lambda: session_status(worker, "caught")["status"] in finals)
        wait_for(lambda: worker.get_batch_status(batch_id="caught-batch")["status"] in finals)
        assert disk.refused > 0 and worker.get_status()["state"]["unsaved_changes"] > 0
        caught = session_status(worker, "caught")
        if caught["status"] == "failed":  # its outputs' rows could not be written: it says so
            assert "database or disk is full" in caught["error"]
    assert generate(worker, session_id="after", steps=3, background=False)["status"] == "completed"
    assert worker.get_status()["state"]["unsaved_changes"] == 0
    expected = {"caught": caught["status"], "after": "completed",
                "caught-batch": worker.get_batch_status(batch_id="caught-batch")["status"]}
    worker.close(timeout=30)
    again = durable()
    assert {"caught": session_status(again, "caught")["status"], "after": session_status(again, "after")["status"],
            "caught-batch": again.get_batch_status(batch_id="caught-batch")["status"]} == expected
