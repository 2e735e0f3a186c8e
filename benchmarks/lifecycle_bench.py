"""The device thread between two UNet forwards: Python time and SQLite writes at step boundaries.

What a step boundary costs the device thread (finishing, admitting, starting
cohorts, listeners) is time the UNet does not run. Two scenarios, each on a
worker with a durable SQLite state file (in a temporary folder):

- join: a long "anchor" session runs; the device is held inside one UNet
  forward (a forward hook) while eight single-image sessions are submitted
  and queued, then let go, so all eight join at that one step boundary as a
  cohort. The gap before the forward whose batch grows is the cohort-start
  gap; the gaps where the nine images run with nobody joining or leaving
  are steady-state gaps.
- steady: eight single-image sessions submitted together on an idle device
  (one cohort, within `coalesce_wait_ms`); the gaps between their forwards.

A gap is the time from the end of one UNet forward (forward hook) to the
start of the next (forward pre-hook), both on a device thread (`ew-device*`),
so it includes the scheduler step of every cohort, admission, cohort starts
and the listeners the device thread calls; it includes the two hooks too
(a few microseconds). SQLite statements are counted by a thin proxy in place
of the state store's connection, by the thread that makes them: per boundary
(`device_sqlite_writes`, the mean over the row's boundaries) and over a whole
join round (every boundary from the one where the eight join to the one where
they leave: their start, their steps beside the anchor, their finish; not the
anchor's own start or cancellation) divided by the cohort starts in it.

Only the UNet hooks, the device worker (`pool.workers[0]`: its `call` and,
to know the eight are queued, its queue's `pending()`) and the store's
connection are touched, so the figures survive a restructuring of the
engine's sessions and batches.

    python -m benchmarks.lifecycle_bench [--quick] [--model-cache DIR]
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

from embedded_worker import ProcessingWorker, testing

from .common import median, percentiles, table
from .worker_bench import MODEL, PROMPT, make_worker

STEPS = 20
ANCHOR_STEPS = 150  # limits.max_steps: far more than the joiners' 20 plus the forwards before they join
JOINERS = 8
MAX_BATCH = JOINERS + 1  # the anchor and all eight joiners in one forward
COALESCE_WAIT_MS = 250.0  # eight submits on an idle device start as one cohort (they never fill MAX_BATCH)
FINAL = ("completed", "failed", "cancelled")
DEVICE_THREAD = "ew-device"


def _on_device() -> bool:
    return threading.current_thread().name.startswith(DEVICE_THREAD)


class CountingConnection:
    """Stands in for the store's sqlite3.Connection: counts statements by thread, delegates everything."""

    def __init__(self, db):
        self._db = db
        self.device_writes = 0
        self.device_reads = 0
        self.other_writes = 0
        self.device_statements: Counter = Counter()  # the device thread's writes by their statement's opening

    def _count(self, sql: str, statements: int = 1) -> None:
        write = not sql.lstrip().upper().startswith("SELECT")
        if _on_device():
            if write:
                self.device_writes += statements
                self.device_statements[" ".join(sql.split()[:3])] += statements
            else:
                self.device_reads += statements
        elif write:
            self.other_writes += statements

    def execute(self, sql, *args, **kwargs):
        self._count(sql)
        return self._db.execute(sql, *args, **kwargs)

    def executemany(self, sql, *args, **kwargs):
        self._count(sql)
        return self._db.executemany(sql, *args, **kwargs)

    def executescript(self, sql, *args, **kwargs):
        self._count(sql)
        return self._db.executescript(sql, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._db, name)


class ForwardRecorder:
    """One entry per UNet forward on the device thread: (start, end, rows, device writes at start and end).

    `hold()` keeps the device inside its next forward until `let_go()`; the forward's end is stamped
    after it is let go, so the wait is in no gap."""

    def __init__(self, unet, counter: CountingConnection):
        self.counter = counter
        self.forwards: list[tuple[float, float, int, int, int]] = []
        self._open: tuple[float, int, int] | None = None
        self._hold = False
        self.held, self._release = threading.Event(), threading.Event()
        self._handles = [unet.register_forward_pre_hook(self._before, with_kwargs=True),
                         unet.register_forward_hook(self._after)]

    def _before(self, _module, args, kwargs):
        if _on_device():
            sample = args[0] if args else kwargs["sample"]
            self._open = (time.perf_counter(), int(sample.shape[0]), self.counter.device_writes)

    def _after(self, *_args):
        if not _on_device() or self._open is None:
            return
        if self._hold:
            self._hold = False
            self.held.set()
            self._release.wait(300)
        started, rows, writes_before = self._open
        self._open = None
        self.forwards.append((started, time.perf_counter(), rows, writes_before, self.counter.device_writes))

    def hold(self) -> None:
        self.held.clear()
        self._release.clear()
        self._hold = True

    def let_go(self) -> None:
        self._release.set()

    def clear(self) -> None:
        self.forwards = []

    def gaps(self) -> list[dict]:
        """Consecutive forwards: the gap between them, rows before and after, device writes in between."""
        f = self.forwards
        return [{"gap_s": f[i + 1][0] - f[i][1], "rows_before": f[i][2], "rows_after": f[i + 1][2],
                 "writes": f[i + 1][3] - f[i][4]} for i in range(len(f) - 1)]

    def remove(self) -> None:
        self._release.set()
        for handle in self._handles:
            handle.remove()


def _submit(worker: ProcessingWorker, seed: int, steps: int = STEPS) -> str:
    reply = worker.execute_workflow(workflow_id="img-generation-basic", background=True,
                                    parameters={"prompt": PROMPT, "steps": steps, "seed": seed, "model": MODEL})
    assert reply["success"], reply
    return reply["session_id"]


def _wait_final(worker: ProcessingWorker, session_ids: list[str], timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    for session_id in session_ids:
        while worker.get_session_status(session_id=session_id)["status"] not in FINAL:
            assert time.monotonic() < deadline, f"session {session_id} never finished"
            time.sleep(0.02)


def _forget(worker: ProcessingWorker, session_ids: list[str]) -> None:
    for session_id in session_ids:
        worker.delete_session(session_id=session_id)


def _wait_until(condition, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.002)


def _device_idle(worker: ProcessingWorker, timeout: float = 60.0) -> None:
    """Until the device runs no image: a final status can come before the device's step boundary that
    takes a cancelled image off, and one more forward of it would fall into the next round's record."""
    device = testing.device_workers(worker)[0]
    deadline = time.monotonic() + timeout
    while device.call(lambda w: getattr(w, "active_images", 0)).result(timeout=timeout):
        assert time.monotonic() < deadline, "the device never went idle"
        time.sleep(0.005)


def join_round(worker: ProcessingWorker, recorder: ForwardRecorder, seed: int) -> dict:
    """An anchor runs; eight sessions are queued while the device is held in a forward, then join at once."""
    queue = getattr(testing.device_workers(worker)[0], "queue", None)
    recorder.clear()
    anchor = _submit(worker, seed, ANCHOR_STEPS)
    _wait_until(lambda: len(recorder.forwards) >= 3)
    recorder.hold()
    assert recorder.held.wait(60), "the anchor never reached its forward"
    joiners = [_submit(worker, seed + 1 + i) for i in range(JOINERS)]
    if queue is not None and hasattr(queue, "pending"):
        _wait_until(lambda: queue.pending() >= JOINERS)
    else:
        time.sleep(0.3)  # no queue to look at: time enough for the submits' hand-off
    time.sleep(0.02)  # the submitting threads settle: the boundary is the device thread's own work
    recorder.let_go()
    _wait_final(worker, joiners)
    worker.control_session(session_id=anchor, action="cancel")
    _wait_final(worker, [anchor])
    _device_idle(worker)
    _forget(worker, [anchor, *joiners])
    gaps = recorder.gaps()
    joined = next(i for i, g in enumerate(gaps) if g["rows_after"] > g["rows_before"])
    left = next((i for i, g in enumerate(gaps) if i > joined and g["rows_after"] < g["rows_before"]), len(gaps) - 1)
    round_writes = sum(g["writes"] for g in gaps[joined:left + 1])  # the eight's start, steps and finish
    return {"gaps": gaps, "round_writes": round_writes, "anchor_rows": recorder.forwards[0][2]}


def steady_round(worker: ProcessingWorker, recorder: ForwardRecorder, seed: int) -> dict:
    """Eight single-image sessions on an idle device: one cohort, then its forwards back to back."""
    recorder.clear()
    writes_before = recorder.counter.device_writes
    sessions = [_submit(worker, seed + i) for i in range(JOINERS)]
    _wait_final(worker, sessions)
    _device_idle(worker)
    _forget(worker, sessions)
    first = recorder.forwards[0]
    return {"gaps": recorder.gaps(), "start_writes": first[3] - writes_before, "first_rows": first[2]}


def lifecycle_rows(model_cache: str, rounds: int = 6) -> tuple[list[dict], dict]:
    rounds = max(2, rounds)
    with tempfile.TemporaryDirectory(prefix="ew-lifecycle-") as folder:
        worker = make_worker(model_cache, state_path=f"{folder}/state.sqlite3", max_batch_size=MAX_BATCH,
                             coalesce_wait_ms=COALESCE_WAIT_MS)
        store = testing.state_store(worker)
        counter = CountingConnection(store._db)
        store._db = counter
        recorder = None
        try:
            device = testing.device_workers(worker)[0]
            unet = device.call(lambda w: w.pipeline(MODEL)[0].unet).result(timeout=120)
            recorder = ForwardRecorder(unet, counter)
            join_round(worker, recorder, 10_000)  # warm: model, prompt cache, learned forward times
            steady_round(worker, recorder, 20_000)
            joins = [join_round(worker, recorder, 1000 * (i + 1)) for i in range(rounds)]
            steadies = [steady_round(worker, recorder, 1000 * (i + 1) + 500) for i in range(rounds)]
        finally:
            if recorder is not None:
                recorder.remove()
            store._db = counter._db
            worker.close(30)
    per_image = joins[0]["anchor_rows"]  # rows of one image's forward (two with guidance)
    grow = [g for r in joins for g in r["gaps"] if g["rows_after"] > g["rows_before"]]
    shrink = [g for r in joins for g in r["gaps"] if g["rows_after"] < g["rows_before"]]
    nine = [g for r in joins for g in r["gaps"]
            if g["rows_after"] == g["rows_before"] == MAX_BATCH * per_image]
    eight = [g for r in steadies for g in r["gaps"] if g["rows_after"] == g["rows_before"] == JOINERS * per_image]
    cohort_starts = len(grow)
    assert cohort_starts == rounds, f"{cohort_starts} joins in {rounds} rounds: the eight did not join at once"
    assert all(g["rows_after"] - g["rows_before"] == JOINERS * per_image for g in grow), grow
    one_cohort = all(r["first_rows"] == JOINERS * per_image for r in steadies)

    def gap_row(scenario: str, boundary: str, gaps: list[dict], starts: int | None = None,
                round_writes: float | None = None) -> dict:
        us = percentiles([g["gap_s"] for g in gaps])
        writes = sum(g["writes"] for g in gaps)
        return {"scenario": scenario, "boundary": boundary, "n": us["n"], "p50_us": us["p50_us"],
                "p99_us": us["p99_us"], "max_us": us["max_us"],
                "device_sqlite_writes": round(writes / len(gaps), 2),
                "round_device_writes_per_cohort_start": round_writes}

    join_round_writes = sum(r["round_writes"] for r in joins) / cohort_starts
    rows = [
        gap_row(f"{JOINERS} sessions join a running anchor", f"cohort start ({JOINERS} join)", grow,
                round_writes=round(join_round_writes, 2)),
        gap_row(f"{JOINERS} sessions join a running anchor", f"steady, {MAX_BATCH} images", nine),
        gap_row(f"{JOINERS} sessions join a running anchor", f"{JOINERS} finish (decode, leave)", shrink),
        gap_row(f"{JOINERS} sessions on an idle device", f"steady, {JOINERS} images", eight),
        raw_pipeline_row(model_cache, rounds),
    ]
    notes = {
        "lifecycle_rounds": rounds, "lifecycle_steps": STEPS, "lifecycle_anchor_steps": ANCHOR_STEPS,
        "lifecycle_max_batch_size": MAX_BATCH, "lifecycle_coalesce_wait_ms": COALESCE_WAIT_MS,
        "lifecycle_state": "durable SQLite file (WAL) in a temporary folder",
        "lifecycle_join_gap_us": {"median": round(median([g["gap_s"] for g in grow]) * 1e6, 1),
                                  "max": round(max(g["gap_s"] for g in grow) * 1e6, 1),
                                  "each": [round(g["gap_s"] * 1e6, 1) for g in grow]},
        "lifecycle_steady9_gap_us": percentiles([g["gap_s"] for g in nine]),
        "lifecycle_steady8_gap_us": percentiles([g["gap_s"] for g in eight]),
        "lifecycle_device_writes_at_join_boundary": [g["writes"] for g in grow],
        "lifecycle_device_writes_per_cohort_start_over_round": round(join_round_writes, 2),
        "lifecycle_device_writes_per_steady_step_9": round(sum(g["writes"] for g in nine) / len(nine), 2),
        "lifecycle_device_writes_per_steady_step_8": round(sum(g["writes"] for g in eight) / len(eight), 2),
        "lifecycle_device_writes_idle_cohort_start": [r["start_writes"] for r in steadies],
        "lifecycle_idle_start_one_cohort": one_cohort,
        "lifecycle_device_sqlite_reads": counter.device_reads,
        "lifecycle_device_sqlite_writes_by_statement": dict(counter.device_statements),
        "lifecycle_other_thread_sqlite_writes": counter.other_writes,
    }
    return rows, notes


def raw_pipeline_row(model_cache: str, rounds: int) -> dict:
    """The floor: the diffusers pipeline's own call, batch 8, has this gap between two UNet forwards
    (its scheduler step, guidance and input scaling); the worker's steady gap less this is its own."""
    import torch

    from .worker_bench import tiny_pipeline

    pipe = tiny_pipeline(model_cache)
    ends: list[float] = []
    gaps: list[float] = []
    def started(module, args) -> None:  # a hook that returns something replaces the forward's arguments
        if ends:
            gaps.append(time.perf_counter() - ends[-1])

    def ended(module, args, output) -> None:
        ends.append(time.perf_counter())

    before = pipe.unet.register_forward_pre_hook(started)
    after = pipe.unet.register_forward_hook(ended)
    try:
        for index in range(rounds):
            ends.clear()
            pipe([PROMPT] * JOINERS, num_inference_steps=STEPS, output_type="np",
                 generator=[torch.Generator().manual_seed(1000 * index + i) for i in range(JOINERS)])
    finally:
        before.remove()
        after.remove()
    us = percentiles(gaps)
    return {"scenario": f"raw diffusers call, batch {JOINERS} (the floor)", "boundary": f"steady, {JOINERS} images",
            "n": us["n"], "p50_us": us["p50_us"], "p99_us": us["p99_us"], "max_us": us["max_us"],
            "device_sqlite_writes": None, "round_device_writes_per_cohort_start": None}


LIFECYCLE_TITLE = "Device thread between two UNet forwards (tiny SD, 32 px, CPU)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--model-cache", default=str(Path(tempfile.gettempdir()) / "embedded_worker_bench_models"))
    args = parser.parse_args(argv)
    rows, notes = lifecycle_rows(args.model_cache, rounds=2 if args.quick else 6)
    print(table(LIFECYCLE_TITLE, rows))
    for key, value in notes.items():
        print(f"- {key}: {value}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
