"""The progress board a host reads without the GIL, and the log records it drains."""

from __future__ import annotations

import threading

import numpy as np

from embedded_worker.progress.board import FIELD, FIELDS, ProgressBoard, id_hash

from .conftest import generate, wait_for


def test_fnv1a_hash_matches_the_reference_values():
    as_int64 = lambda value: value - (1 << 64)  # noqa: E731
    assert id_hash("") == as_int64(0xCBF29CE484222325)  # the published FNV-1a 64 test vectors
    assert id_hash("a") == as_int64(0xAF63DC4C8601EC8C)
    assert id_hash("foobar") == as_int64(0x85944171F73967E8)


def test_a_reader_never_sees_a_torn_row_while_a_writer_runs():
    board = ProgressBoard(4)
    slot = board.claim("session", "torn")
    stop = threading.Event()
    names = [n for n in FIELDS if n not in ("sequence", "updated_unix_ms")]

    def writer() -> None:
        value = 0
        while not stop.is_set():
            value += 1
            board.publish(slot, {name: value for name in names})

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        reads = [board.read(slot) for _ in range(20000)]
    finally:
        stop.set()
        thread.join()
    for row in reads:
        assert len({row[name] for name in names}) == 1, row  # every field from the same write
        assert row["sequence"] % 2 == 0
    assert len({row["progress_bp"] for row in reads}) > 10  # the writer really was moving


def test_slots_are_claimed_published_and_freed(worker):
    reply = generate(worker, session_id="boarded", steps=150, background=True)
    slot = reply["board_slot"]
    assert slot >= 0
    board = worker.progress_board()
    assert board.dtype == np.int64 and board.flags["C_CONTIGUOUS"] and not board.flags["WRITEABLE"]
    row = wait_for(lambda: (r := worker.read_board_slot(slot)) and r["denoise_step"] >= 20 and r)
    assert row["id_hash"] == id_hash("boarded") and row["kind"] == 1
    assert row["state"] == worker.board_layout()["state_codes"]["running"]
    assert 0 < row["progress_bp"] < 10000 and row["denoise_total"] > row["denoise_step"] and row["eta_ms"] > 0
    assert board[slot, FIELD["progress_bp"]] >= row["progress_bp"]  # the very memory a host reads
    worker.control_session(session_id="boarded", action="cancel")
    assert worker.read_board_slot(slot)["state"] == worker.board_layout()["state_codes"]["cancelled"]
    worker.delete_session(session_id="boarded")
    assert worker.read_board_slot(slot)["kind"] == 0


def test_batches_are_on_the_board_with_item_counts(worker):
    reply = worker.execute_batch(workflow_id="img-generation-basic", background=False,
                                 parameters={"steps": 3, "seed": 1, "total_images": 3})
    row = worker.read_board_slot(reply["board_slot"])
    assert (row["kind"], row["items_done"], row["items_total"], row["progress_bp"]) == (2, 3, 3, 10000)


def test_a_full_board_leaves_work_unboarded_but_working(make_worker):
    worker = make_worker(board_slots=1)
    first = generate(worker, background=False)
    second = generate(worker, background=False)
    assert first["board_slot"] == 0 and second["board_slot"] == -1 and second["status"] == "completed"


def test_log_records_are_drained_in_order_and_drops_are_counted(make_worker):
    worker = make_worker(log_capacity=3)
    for seed in range(3):
        generate(worker, seed=seed, background=False)
    drained = worker.drain_logs(100)
    assert drained["success"] and len(drained["records"]) == 3 and drained["dropped"] > 0
    assert all({"time", "level", "logger", "message", "thread"} <= set(r) for r in drained["records"])
    assert "completed with 1 output" in drained["records"][-1]["message"]
    assert worker.drain_logs(100)["records"] == []
    assert worker.drain_logs(0)["error_code"] == "invalid_request"
