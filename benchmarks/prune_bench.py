"""Retention at start: a state file with many finished sessions, a worker started on it, one 1-step session.

The store is filled through its own API (finished session rows, no files) before the worker starts with
`retention.max_finished` below the row count, so the start finds a prune backlog. Figures: how long the
start took, how many prune tasks went onto the CPU pool (the pool every run's continuations use) and how
many waited there at once, how long a 1-step session submitted right after the start took, and when the
backlog was gone. A row with `max_finished` above the row count is the same start with nothing to prune.

    python -m benchmarks.prune_bench [--quick] [--model-cache DIR]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from embedded_worker import ProcessingWorker, WorkerConfig
from embedded_worker import engine as engine_module
from embedded_worker import testing
from embedded_worker.lifecycle.retention import Retention
from embedded_worker.lifecycle.state import ADDED, COMPLETED, SessionRecord
from embedded_worker.lifecycle.store import StateStore

from .common import table
from .worker_bench import MODEL, PROMPT

ROWS = 30_000
MAX_FINISHED = 1_000
PRUNE_TITLE = "Retention at start: a 1-step session on a worker started on N finished sessions (prune backlog)"


def write_finished_sessions(path: Path, rows: int) -> None:
    """`rows` completed sessions, oldest first, through the store's own write."""
    store = StateStore(path)
    finished_at = time.time() - rows
    try:
        for index in range(rows):
            record = SessionRecord(id=f"old-{index}", status=COMPLETED, workflow_id="img-generation-basic",
                                   created_at=finished_at + index, completed_at=finished_at + index)
            store.record_event(record, ADDED)
    finally:
        store.close()


class PruneCounter:
    """Counts the prune tasks the engine's CPU pool is given: all of them, and the most waiting at once."""

    def __init__(self):
        self.lock = threading.Lock()
        self.queued = self.waiting = self.most_waiting = 0

    def pool_class(self) -> type:
        counter = self

        class CountingPool(ThreadPoolExecutor):
            def submit(self, fn, /, *args, **kwargs):
                if not isinstance(getattr(fn, "__self__", None), Retention):
                    return super().submit(fn, *args, **kwargs)
                with counter.lock:
                    counter.queued += 1
                    counter.waiting += 1
                    counter.most_waiting = max(counter.most_waiting, counter.waiting)

                def started(*inner_args, **inner_kwargs):
                    with counter.lock:
                        counter.waiting -= 1
                    return fn(*inner_args, **inner_kwargs)

                return super().submit(started, *args, **kwargs)

        return CountingPool


def prune_storm(model_cache: str, rows: int, max_finished: int) -> dict:
    folder = Path(tempfile.mkdtemp(prefix="ew-prune-bench-"))
    state = folder / "state.sqlite3"
    write_finished_sessions(state, rows)
    counter = PruneCounter()
    original = engine_module.ThreadPoolExecutor
    engine_module.ThreadPoolExecutor = counter.pool_class()
    try:
        config = WorkerConfig.model_validate({
            "model_cache_dir": model_cache, "state_path": str(state), "default_model": MODEL, "workflows_dir": None,
            "retention": {"max_finished": max_finished}, "scheduling": {"coalesce_wait_ms": 0}})
        started = time.perf_counter()
        worker = ProcessingWorker(config)
        start_s = time.perf_counter() - started
        queued_at_start = counter.queued
        try:
            began = time.perf_counter()
            reply = worker.execute_workflow(workflow_id="img-generation-basic", background=False,
                                            parameters={"prompt": PROMPT, "steps": 1, "seed": 1, "model": MODEL})
            session_s = time.perf_counter() - began
            assert reply["status"] == "completed", reply
            while len(testing.session_ids(worker)) > max_finished:
                time.sleep(0.05)
            pruned_s = time.perf_counter() - started
        finally:
            worker.close(timeout=60)
    finally:
        engine_module.ThreadPoolExecutor = original
        shutil.rmtree(folder, ignore_errors=True)
    return {"finished_rows": rows, "max_finished": max_finished, "start_s": round(start_s, 2),
            "one_step_session_s": round(session_s, 3), "prune_tasks_queued_at_start": queued_at_start,
            "prune_tasks_queued": counter.queued, "most_prune_tasks_waiting": counter.most_waiting,
            "backlog_gone_after_s": round(pruned_s, 2)}


def _warm_up(model_cache: str) -> None:
    """Imports, the model files and a first forward: paid here, not by the first row's start or session."""
    worker = ProcessingWorker(WorkerConfig.model_validate({
        "model_cache_dir": model_cache, "state_path": ":memory:", "default_model": MODEL, "workflows_dir": None}))
    try:
        worker.execute_workflow(workflow_id="img-generation-basic", background=False,
                                parameters={"prompt": PROMPT, "steps": 1, "seed": 1, "model": MODEL})
    finally:
        worker.close(timeout=60)


def prune_rows(model_cache: str, quick: bool = False) -> list[dict]:
    rows = 5_000 if quick else ROWS
    _warm_up(model_cache)
    return [prune_storm(model_cache, rows, MAX_FINISHED), prune_storm(model_cache, rows, rows + 10)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--model-cache", default=str(Path(tempfile.gettempdir()) / "embedded_worker_bench_models"))
    args = parser.parse_args()
    print(table(PRUNE_TITLE, prune_rows(args.model_cache, args.quick)))


if __name__ == "__main__":
    main()
