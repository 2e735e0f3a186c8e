"""Interactive work against bulk work: a single-image session on an idle worker and while a batch runs.

Figures: the session's time to image idle, then submitted while a 48-item
batch runs, at priority 10 and at the default priority (5, the batch's own);
the batch's wall time alone and with the interruption. What the batch loses
beyond the device time the interruption itself used is
`with - alone - session_idle`, as a share of `alone`.

The timeline plot shows which request's images were in each forward (the
device worker's `trace`, when it has one).

    python -m benchmarks.preemption_bench [--model-cache DIR] [--policy fair|fifo]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from embedded_worker import ProcessingWorker, WorkerConfig, testing

from .common import RESULTS, median, repository_path, table, write_results

STEPS = 20
BATCH_ITEMS = 48
MODEL = "builtin:tiny-sd"  # named: the default model may change, these figures are for this one
PROMPT = "a lighthouse on a cliff at dusk"


def _worker(model_cache: str, policy: str | None) -> ProcessingWorker:
    scheduling = {"coalesce_wait_ms": 5.0, "max_batch_size": 8}
    if policy is not None:
        scheduling["policy"] = policy
    return ProcessingWorker(WorkerConfig.model_validate({
        "model_cache_dir": model_cache, "state_path": ":memory:", "workflows_dir": None,
        "default_model": MODEL, "scheduling": scheduling}))


def _session(worker: ProcessingWorker, priority: int, seed: int) -> tuple[float, int]:
    """Seconds to image, and UNet forwards the device ran meanwhile (a figure a loaded machine cannot blur)."""
    steps_before = _device(worker).counters.steps
    started = time.perf_counter()
    reply = worker.execute_workflow(workflow_id="img-generation-basic", background=False, priority=priority,
                                    parameters={"prompt": PROMPT, "steps": STEPS, "seed": seed, "model": MODEL})
    elapsed = time.perf_counter() - started
    forwards = _device(worker).counters.steps - steps_before
    assert reply["status"] == "completed", reply
    worker.delete_session(session_id=reply["session_id"])
    return elapsed, forwards


def _batch(worker: ProcessingWorker, batch_id: str) -> None:
    reply = worker.execute_batch(batch_id=batch_id, workflow_id="img-generation-basic",
                                 parameters={"prompt": PROMPT, "steps": STEPS, "seed": 0, "model": MODEL,
                                             "total_images": BATCH_ITEMS})
    assert reply["success"], reply


def _wait_final(worker: ProcessingWorker, batch_id: str) -> None:
    while worker.get_batch_status(batch_id=batch_id)["status"] not in ("completed", "failed", "cancelled"):
        time.sleep(0.005)


def _device(worker: ProcessingWorker):
    return testing.device_workers(worker)[0]


def scenario(worker: ProcessingWorker, priority: int | None, tag: str) -> dict:
    """A 48-item batch; with `priority`, a session submitted once the batch's first forwards ran."""
    device = _device(worker)
    trace = getattr(device, "trace", None)
    if trace is not None:
        trace.clear()
    forwards_before = device.counters.forwards
    batch_id = f"bulk-{tag}"
    started = time.perf_counter()
    _batch(worker, batch_id)
    session_s = session_forwards = None
    if priority is not None:
        while device.counters.forwards - forwards_before < 3:  # the batch is on the device
            time.sleep(0.001)
        session_s, session_forwards = _session(worker, priority, 7)
    _wait_final(worker, batch_id)
    batch_s = time.perf_counter() - started
    worker.delete_batch(batch_id=batch_id)
    return {"session_s": session_s, "session_forwards": session_forwards, "batch_s": batch_s, "forwards": device.counters.forwards - forwards_before,
            "trace": list(trace) if trace is not None else None}


def preemption_rows(model_cache: str, rounds: int = 3, policy: str | None = None) -> tuple[list[dict], dict]:
    worker = _worker(model_cache, policy)
    try:
        _session(worker, 5, 1)  # load and warm
        worker.execute_batch(batch_id="warm", workflow_id="img-generation-basic", background=False,
                             parameters={"prompt": PROMPT, "steps": STEPS, "seed": 0, "model": MODEL,
                                         "total_images": 8})  # learn what a forward of 8 costs
        idle_runs = [_session(worker, 5, 1 + i) for i in range(max(3, rounds))]
        idle = median([s for s, _ in idle_runs])
        idle_forwards = median([f for _, f in idle_runs])
        alone, urgent, same = [], [], []
        timelines = {}
        for index in range(rounds):
            alone.append(scenario(worker, None, f"a{index}"))
            urgent.append(scenario(worker, 10, f"u{index}"))
            same.append(scenario(worker, 5, f"s{index}"))
        timelines = {"priority 10": urgent[-1]["trace"], "priority 5": same[-1]["trace"]}
    finally:
        worker.close(30)
    batch_alone = median([r["batch_s"] for r in alone])
    rows = [{"scenario": "session alone (idle worker)", "session_s": round(idle, 3), "vs_idle": 1.0,
             "session_forwards": idle_forwards, "forwards_vs_idle": 1.0, "batch_s": None, "batch_loss_pct": None}]
    for label, runs in (("session at priority 10 during the batch", urgent),
                        ("session at priority 5 during the batch", same)):
        session_s = median([r["session_s"] for r in runs])
        batch_s = median([r["batch_s"] for r in runs])
        forwards = median([r["session_forwards"] for r in runs])
        rows.append({"scenario": label, "session_s": round(session_s, 3), "vs_idle": round(session_s / idle, 2),
                     "session_forwards": forwards, "forwards_vs_idle": round(forwards / idle_forwards, 2),
                     "batch_s": round(batch_s, 3),
                     "batch_loss_pct": round(100 * (batch_s - batch_alone - idle) / batch_alone, 1)})
    rows.append({"scenario": f"batch of {BATCH_ITEMS} alone", "session_s": None, "vs_idle": None,
                 "session_forwards": None, "forwards_vs_idle": None,
                 "batch_s": round(batch_alone, 3), "batch_loss_pct": 0.0})
    notes = {"preemption_rounds": rounds, "preemption_steps": STEPS, "preemption_batch_items": BATCH_ITEMS,
             "goal_priority10_vs_idle": 1.5, "goal_default_priority_vs_idle": 3.5, "goal_batch_loss_pct": 5}
    return rows, {**notes, "timelines": timelines}


def write_timeline(timelines: dict, folder: Path) -> str | None:
    """Gantt-style: for each forward, how many images of each request were in it."""
    timelines = {k: v for k, v in timelines.items() if v}
    if not timelines:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(len(timelines), 1, figsize=(9, 2.6 * len(timelines)), squeeze=False)
    for axis, (label, trace) in zip(axes[:, 0], timelines.items()):
        owners = sorted({owner for forward in trace for owner in forward}, key=lambda o: (not o.startswith("bulk"), o))
        for row, owner in enumerate(owners):
            counts = [forward.get(owner, 0) for forward in trace]
            spans = [(i, 1) for i, c in enumerate(counts) if c]
            colour = "tab:gray" if owner.startswith("bulk") else "tab:red"
            axis.broken_barh(spans, (row - 0.4, 0.8), color=colour)
            for i, c in enumerate(counts):
                if c and not owner.startswith("bulk"):
                    axis.text(i + 0.5, row, str(c), ha="center", va="center", fontsize=6, color="white")
        axis.set_yticks(range(len(owners)), ["batch" if o.startswith("bulk") else "session" for o in owners])
        axis.set_xlabel("UNet forward")
        axis.set_title(f"{BATCH_ITEMS}-item batch with a single-image session at {label}")
    path = folder / "preemption_timeline.png"
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return repository_path(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-cache", default=str(Path(tempfile.gettempdir()) / "embedded_worker_bench_models"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--policy", default=None)
    args = parser.parse_args(argv)
    rows, notes = preemption_rows(args.model_cache, args.rounds, args.policy)
    title = "Interactive during bulk: a 1-image session against a 48-item batch (tiny SD, 20 steps)"
    print(table(title, rows))
    timeline = write_timeline(notes.pop("timelines"), RESULTS)
    json_path, md_path = write_results("preemption", {title: rows},
                                       {**notes, "policy": args.policy or "default", "plots": [timeline]})
    print(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
