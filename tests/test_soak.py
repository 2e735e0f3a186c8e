"""Load: many sessions, many threads of status and control, faults injected; nothing lost or stuck.

`test_disk_full_soak` fills the state file's disk while threads submit: what cannot be stored is
refused whole, and once space returns the same requests run; nothing lost.

The mix holds what hostile callers send too: ids that look like paths, ids another kind of record
already has, JSON nested thousands deep. Then the worker is closed while the load goes on, and a second
worker on the same state file finishes everything that was accepted.

`make soak` runs the long version (200 sessions, 16 threads, 60 s) and prints what it held;
`make test` runs a short one.
"""

from __future__ import annotations

import random
import shutil
import threading
import time
from dataclasses import dataclass, field

import psutil
import pytest

from embedded_worker import ProcessingWorker, WorkerConfig, testing
from embedded_worker.diffusion.tiny_model import ensure_tiny_model

from .conftest import settle, wait_for
from .helpers.full_disk import FullDisk


@dataclass
class Tally:
    requests: int = 0
    faults_injected: int = 0
    controls: int = 0
    escapes: int = 0  # sessions with path-like ids, bounded so the settle stays proportionate to `sessions`
    accepted: set = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, **counts) -> None:
        with self.lock:
            for name, value in counts.items():
                setattr(self, name, getattr(self, name) + value)


def soak(model_cache, tmp_path, sessions: int, threads: int, seconds: float) -> dict:
    broken = tmp_path / "broken-model"
    shutil.copytree(ensure_tiny_model("builtin:tiny-sd", model_cache), broken)
    weights = broken / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # a real fault: some sessions ask for a model that cannot load
    threads_before = threading.active_count()
    process = psutil.Process()
    config = WorkerConfig(model_cache_dir=model_cache, state_path=str(tmp_path / "state.sqlite3"),
                          models={"broken": str(broken)}, limits={"max_queued_work": 10_000},
                          scheduling={"coalesce_wait_ms": 5}, default_model="builtin:tiny-sd")
    worker = ProcessingWorker(config)
    deep = '{"workflow_id": "img-generation-basic", "parameters": {"x": ' + "[" * 3000 + "]" * 3000 + "}}"
    tally = Tally()
    rng = random.Random(7)

    def submit(index: int) -> None:
        faulty = index % 17 == 5
        parameters = {"prompt": f"soak {index}", "seed": index, "steps": rng.randint(3, 8)}
        if faulty:
            parameters["model"] = "broken"
        workflow = "img-upscale-enhance" if index % 5 == 0 else "img-generation-basic"
        reply = worker.execute_workflow(session_id=f"soak-{index}", workflow_id=workflow, parameters=parameters,
                                        priority=rng.randint(1, 10))
        assert reply["success"], reply
        tally.add(requests=1, faults_injected=int(faulty))
        with tally.lock:
            tally.accepted.add(reply["session_id"])

    for index in range(sessions):
        submit(index)
    rss_start = process.memory_info().rss
    stop = threading.Event()
    errors: list = []

    def load(seed: int) -> None:
        local = random.Random(seed)
        while not stop.wait(0.002):
            session_id = f"soak-{local.randrange(sessions)}"
            roll = local.random()
            if roll < 0.75:
                reply = worker.get_session_status(session_id=session_id)
            elif roll < 0.9:
                reply = worker.control_session(session_id=session_id,
                                               action=local.choice(["pause", "resume", "resume", "restart"]))
                tally.add(controls=1)
            elif roll < 0.95:
                reply = worker.execute(local.choice(["execute_workflow", "control_session", "bogus"]),
                                       local.choice(["{", "[]", '{"priority": 99}', '{"session_id": ""}', deep]))
                tally.add(faults_injected=1)
            elif roll < 0.96:  # an id another kind of record has: refused, and the store stays openable
                reply = worker.execute_batch(batch_id=session_id, workflow_id="img-generation-basic")
                tally.add(faults_injected=1)
            elif roll < 0.97 and tally.escapes < sessions // 4:  # a path-like id: accepted, files stay inside
                tally.add(escapes=1)
                escape_id = f"../../soak-escape-{seed}-{local.randrange(10**9)}"
                reply = worker.execute_workflow(session_id=escape_id, workflow_id="img-generation-basic",
                                                parameters={"prompt": "escape", "steps": 3})
                if reply["success"]:
                    with tally.lock:
                        tally.accepted.add(escape_id)
                tally.add(faults_injected=1)
            else:
                reply = worker.get_status()
            tally.add(requests=1)
            if isinstance(reply, str):
                continue
            expected = ("invalid_state", "invalid_request", "not_found") + (("unavailable",) if worker.closed else ())
            if not reply["success"] and reply["error_code"] not in expected:
                errors.append(reply)

    workers = [threading.Thread(target=load, args=(n,), name=f"soak-{n}") for n in range(threads)]
    for thread in workers:
        thread.start()
    time.sleep(seconds)
    closed_under_load = worker.close(timeout=0)  # the load goes on against a closed worker meanwhile
    stop.set()
    for thread in workers:
        thread.join(60)
    worker = ProcessingWorker(config)  # the next process: finishes what the first accepted
    finals = settle(worker, sorted(tally.accepted), timeout=600)
    lost = [s for s, r in finals.items() if not r["success"]]
    lost += [s for s, r in finals.items() if r["status"] == "completed"
             and not all(worker.get_output(o["output_id"]) is not None for o in r["outputs"] if r["outputs"])]
    lost += [s for s, r in finals.items() if r["status"] == "completed" and not r["outputs"]]
    rss_growth = process.memory_info().rss - rss_start
    statuses = [r["status"] for r in finals.values()]
    written = [p for p in tmp_path.parent.rglob("*soak-escape*")]
    escaped = [p for p in written if not p.is_relative_to(tmp_path)]
    closed = worker.close(timeout=60)
    wait_for(lambda: threading.active_count() <= threads_before, timeout=30)
    summary = {
        "requests": tally.requests, "sessions": len(tally.accepted), "threads": threads, "seconds": seconds,
        "controls": tally.controls, "faults_injected": tally.faults_injected,
        "completed": statuses.count("completed"), "failed": statuses.count("failed"),
        "cancelled": statuses.count("cancelled"), "items_lost": len(lost), "unexpected_errors": len(errors),
        "rss_growth_mb": round(rss_growth / 2**20, 1), "threads_after_close": threading.active_count(),
        "threads_before": threads_before, "closed_cleanly": closed["threads_stopped"],
        "closed_under_load": closed_under_load["threads_stopped"], "files_escaped": len(escaped),
    }
    print("\nsoak held: " + ", ".join(f"{k}={v}" for k, v in summary.items()))
    assert not errors, errors[:3]
    assert closed_under_load["threads_stopped"] and escaped == []
    assert lost == [] and summary["items_lost"] == 0
    assert summary["failed"] >= 1 and summary["completed"] > sessions // 2
    assert rss_growth < 512 * 2**20
    assert closed["threads_stopped"] and threading.active_count() <= threads_before
    return summary


def test_short_soak(model_cache, tmp_path):
    soak(model_cache, tmp_path, sessions=30, threads=6, seconds=6)


@pytest.mark.soak
def test_soak(model_cache, tmp_path):
    soak(model_cache, tmp_path, sessions=200, threads=16, seconds=60)


def prune_storm(model_cache, tmp_path, monkeypatch, rows: int, sessions: int) -> dict:
    """A start on `rows` finished sessions with `max_finished` far below them, `sessions` live sessions
    submitted at once from four threads while the backlog is pruned: each completes with its outputs, at
    most one prune task waits on the CPU pool at any time, and the backlog ends at `max_finished`."""
    from benchmarks.prune_bench import PruneCounter, write_finished_sessions
    from embedded_worker import engine as engine_module

    keep = 1_000
    state = tmp_path / "state.sqlite3"
    write_finished_sessions(state, rows)
    counter = PruneCounter()
    monkeypatch.setattr(engine_module, "ThreadPoolExecutor", counter.pool_class())
    worker = ProcessingWorker(WorkerConfig(model_cache_dir=model_cache, state_path=str(state),
                                           retention={"max_finished": keep}, limits={"max_queued_work": 10_000},
                                           scheduling={"coalesce_wait_ms": 5}, default_model="builtin:tiny-sd"))
    try:
        backlog_at_start = len(testing.session_ids(worker)) - keep
        ids = [f"live-{n}" for n in range(sessions)]

        def submit(share: list[str]) -> None:
            for session_id in share:
                reply = worker.execute_workflow(session_id=session_id, workflow_id="img-generation-basic",
                                                parameters={"prompt": session_id, "steps": 3, "seed": 1})
                assert reply["success"], reply

        submitters = [threading.Thread(target=submit, args=(ids[n::4],)) for n in range(4)]
        for thread in submitters:
            thread.start()
        for thread in submitters:
            thread.join(120)
        finals = settle(worker, ids, timeout=600)
        backlog_when_settled = len(testing.session_ids(worker)) - keep
        wait_for(lambda: len(testing.session_ids(worker)) <= keep, timeout=600)
        lost = [s for s, r in finals.items() if r["status"] != "completed" or not r["outputs"]]
        summary = {"rows": rows, "sessions": sessions, "backlog_at_start": backlog_at_start,
                   "backlog_when_settled": backlog_when_settled, "prune_tasks": counter.queued,
                   "most_prune_tasks_waiting": counter.most_waiting, "lost": len(lost)}
        print("\nprune storm held: " + ", ".join(f"{k}={v}" for k, v in summary.items()))
        assert lost == []
        assert all(s in testing.session_ids(worker) for s in ids)  # the newest are kept
        assert counter.most_waiting <= 1
        return summary
    finally:
        worker.close(timeout=60)


@pytest.mark.soak
def test_soak_prune_storm(model_cache, tmp_path, monkeypatch):
    prune_storm(model_cache, tmp_path, monkeypatch, rows=30_000, sessions=40)


@pytest.mark.soak
def test_soak_exits_without_close(model_cache, tmp_path, make_worker):
    """Three rounds of three processes on a state file of their own, each ending while a step is under way
    (no close, a refused close, a close) and each resuming the session the one before suspended: every exit
    is clean and the session stays resumable (4 starts: under the restart limit that quarantines)."""
    from .test_exit_without_close import exit_run

    for round_ in range(3):
        state_path = tmp_path / f"state-{round_}.sqlite3"
        for how in ("no-close", "refused-close", "close"):
            done = exit_run(model_cache, state_path, how)
            assert done.returncode == 0, (round_, how, done.stderr[-2000:])
        resumed = make_worker(state_path=str(state_path))
        assert resumed.get_session_status(session_id="long")["status"] in ("pending", "running")
        assert resumed.close(timeout=0)["success"]


def disk_full_soak(model_cache, tmp_path, rounds: int, submitters: int, per_submitter: int) -> dict:
    """Rounds of: work in flight, then the disk fills while many threads submit sessions and batches (all
    refused, nothing of them left), then space returns and the same ids are sent again. Every piece of
    work accepted ends final, and a restart finds each as it ended."""
    config = WorkerConfig(model_cache_dir=model_cache, state_path=str(tmp_path / "state.sqlite3"),
                          limits={"max_queued_work": 10_000}, scheduling={"coalesce_wait_ms": 5},
                          default_model="builtin:tiny-sd")
    worker = ProcessingWorker(config)
    accepted: dict[str, str] = {}  # id -> "session" or "batch"
    errors: list = []
    refused = 0

    def submit(kind: str, record_id: str) -> dict:
        if kind == "session":
            return worker.execute_workflow(session_id=record_id, workflow_id="img-generation-basic",
                                           parameters={"prompt": record_id, "seed": 3, "steps": 3})
        return worker.execute_batch(batch_id=record_id, workflow_id="img-generation-basic",
                                    parameters={"total_images": 2, "steps": 3, "prompt": record_id, "seed": 3})

    def status(kind: str, record_id: str) -> dict:
        if kind == "session":
            return worker.get_session_status(session_id=record_id)
        return worker.get_batch_status(batch_id=record_id, include_items=True)

    for round_ in range(rounds):
        for kind, record_id in [("session", f"r{round_}-live-{n}") for n in range(4)] + [("batch", f"r{round_}-b")]:
            reply = submit(kind, record_id)
            if not reply["success"]:
                errors.append(reply)
            accepted[record_id] = kind
        full = [("batch" if (n + j) % 3 == 0 else "session", f"r{round_}-full-{n}-{j}")
                for n in range(submitters) for j in range(per_submitter)]
        with FullDisk(testing.state_store(worker)) as disk:
            def hammer(share: list[tuple[str, str]]) -> None:
                for kind, record_id in share:
                    reply = submit(kind, record_id)
                    if reply["success"] or reply["error_code"] != "unavailable":
                        errors.append(reply)
                    live = status("session", f"r{round_}-live-0")  # answers stay possible on a full disk
                    if not live["success"]:
                        errors.append(live)

            threads = [threading.Thread(target=hammer, args=(full[n::submitters],)) for n in range(submitters)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(600)
            refused += disk.refused
            left = [record_id for kind, record_id in full if status(kind, record_id)["success"]]
            processing = worker.get_status()["processing"]
            counted = processing["sessions"]["total"] + processing["batches"]["total"]
            if left or counted != len(accepted):
                errors.append({"left_behind": left, "counted": counted, "accepted": len(accepted)})
        for kind, record_id in full:  # space is back: the same ids are new work, and run
            reply = submit(kind, record_id)
            if not reply["success"] or reply["duplicate"]:
                errors.append(reply)
            accepted[record_id] = kind

    finals = ("completed", "failed", "cancelled")
    wait_for(lambda: all(status(kind, record_id)["status"] in finals for record_id, kind in accepted.items()),
             timeout=900, interval=0.2)
    ended = {record_id: status(kind, record_id) for record_id, kind in accepted.items()}
    unsound = [r for r, reply in ended.items() if reply["status"] == "failed"
               and ("-full-" in r or "database or disk is full" not in str(reply))]
    unsound += [r for r, reply in ended.items() if reply["status"] == "completed" and not reply["outputs"]]
    worker.close(timeout=60)
    worker = ProcessingWorker(config)  # the next process finds everything as it ended
    lost = [r for r, kind in accepted.items() if status(kind, r).get("status") != ended[r]["status"]]
    lost += [r for r, reply in ended.items() if reply["status"] == "completed" and not all(
        worker.get_output(o["output_id"]) is not None for o in reply["outputs"])]
    unsaved = worker.get_status()["state"]["unsaved_changes"]
    worker.close(timeout=60)
    summary = {"rounds": rounds, "accepted": len(accepted), "writes_refused": refused, "errors": len(errors),
               "completed": sum(r["status"] == "completed" for r in ended.values()),
               "failed_on_full_disk": sum(r["status"] == "failed" for r in ended.values()),
               "unsound": len(unsound), "lost": len(lost), "unsaved_changes": unsaved}
    print("\ndisk-full soak held: " + ", ".join(f"{k}={v}" for k, v in summary.items()))
    assert not errors, errors[:3]
    assert unsound == [] and lost == [] and unsaved == 0
    assert refused >= rounds * submitters * per_submitter
    return summary


@pytest.mark.soak
def test_disk_full_soak(model_cache, tmp_path):
    disk_full_soak(model_cache, tmp_path, rounds=3, submitters=8, per_submitter=10)
