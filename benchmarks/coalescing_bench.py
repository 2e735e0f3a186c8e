"""Cross-request coalescing: eight single-image sessions, together against one by one and a raw batch.

Also the sweep behind the plot: images/s as concurrent sessions grow (the
worker coalescing them) beside images/s as the raw pipeline's batch grows.
"""

from __future__ import annotations

import threading
import time

import torch

from embedded_worker import testing

from .common import median, repository_path
from .worker_bench import PROMPT, make_worker, raw_pipeline_rate

STEPS = 20


def _session(worker, seed: int, parameters: dict) -> None:
    reply = worker.execute_workflow(workflow_id="img-generation-basic", background=False,
                                    parameters={"prompt": PROMPT, "steps": STEPS, "seed": seed, **parameters})
    assert reply["status"] == "completed", reply
    worker.delete_session(session_id=reply["session_id"])


def concurrent_rate(worker, sessions: int, seed: int, **parameters) -> float:
    """`parameters`: what else each session's workflow is given (model, guidance_scale, size)."""
    threads = [threading.Thread(target=_session, args=(worker, seed + i, parameters)) for i in range(sessions)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sessions / (time.perf_counter() - started)


def sequential_rate(worker, sessions: int, seed: int, **parameters) -> float:
    started = time.perf_counter()
    for i in range(sessions):
        _session(worker, seed + i, parameters)
    return sessions / (time.perf_counter() - started)


def coalescing_rows(model_cache: str, pipe, rounds: int) -> tuple[list[dict], dict]:
    worker = make_worker(model_cache, max_batch_size=8)
    try:
        forwards_before = testing.device_workers(worker)[0].counters.forwards
        concurrent_rate(worker, 8, 0)  # warm
        raw_pipeline_rate(pipe, 8, STEPS, 1)
        together, alone, raw = [], [], []
        for index in range(rounds):
            together.append(concurrent_rate(worker, 8, 100 * index))
            alone.append(sequential_rate(worker, 8, 100 * index))
            raw += raw_pipeline_rate(pipe, 8, STEPS, 1)
        forwards = testing.device_workers(worker)[0].counters.forwards - forwards_before
    finally:
        worker.close(30)
    coalesced, one_by_one, raw_batch = median(together), median(alone), median(raw)
    rows = [
        {"how": "8 concurrent sessions, coalesced", "img_s": round(coalesced, 2),
         "vs_one_by_one": round(coalesced / one_by_one, 2),
         "vs_raw_batch_pct": round(100 * (coalesced / raw_batch - 1), 1)},
        {"how": "8 sessions one by one", "img_s": round(one_by_one, 2), "vs_one_by_one": 1.0,
         "vs_raw_batch_pct": round(100 * (one_by_one / raw_batch - 1), 1)},
        {"how": "raw diffusers call, batch 8", "img_s": round(raw_batch, 2),
         "vs_one_by_one": round(raw_batch / one_by_one, 2), "vs_raw_batch_pct": 0.0},
    ]
    notes = {"coalescing_rounds": rounds, "coalescing_steps": STEPS, "unet_forwards_in_bench": forwards}
    return rows, notes


def sweep(model_cache: str, pipe, sizes=(1, 2, 4, 8, 16)) -> list[dict]:
    """Images/s against concurrent sessions (worker) and against raw batch size. The worker may make cohorts
    as large as the largest raw batch: capped at 8 (the default `max_batch_size`), 16 sessions ran as two
    cohorts of 8 against one raw batch of 16, 5.5 against 7.5 img/s in one run (issue 22)."""
    worker = make_worker(model_cache, max_batch_size=max(sizes))
    rows = []
    try:
        concurrent_rate(worker, 2, 0)
        for size in sizes:
            rows.append({"n": size,
                         "worker_sessions_img_s": round(concurrent_rate(worker, size, 1000 * size), 2),
                         "raw_pipeline_batch_img_s": round(median(raw_pipeline_rate(pipe, size, STEPS, 2)), 2)})
    finally:
        worker.close(30)
    return rows


def write_plots(sweep_rows: list[dict], status_samples_us: list[float], folder) -> list[str]:
    """images/s against concurrency and batch size; the status-latency histogram under load."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    figure, axis = plt.subplots(figsize=(6.4, 4))
    n = [r["n"] for r in sweep_rows]
    axis.plot(n, [r["worker_sessions_img_s"] for r in sweep_rows], "o-", label="worker: N concurrent sessions")
    axis.plot(n, [r["raw_pipeline_batch_img_s"] for r in sweep_rows], "s--", label="raw pipeline: batch of N")
    axis.set_xscale("log", base=2)
    axis.set_xlabel("N (sessions at once / batch size)")
    axis.set_ylabel("images per second")
    axis.set_title(f"Tiny SD, 32 px, {STEPS} steps, CPU ({torch.get_num_threads()} threads)")
    axis.grid(True, alpha=0.3)
    axis.legend()
    path = folder / "throughput.png"
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    written.append(repository_path(path))

    figure, axis = plt.subplots(figsize=(6.4, 4))
    axis.hist(status_samples_us, bins=[2 ** (k / 4) for k in range(4, 4 * 15)], color="tab:blue")
    axis.set_xscale("log")
    axis.set_yscale("log")
    axis.set_xlabel("get_session_status latency (microseconds, log)")
    axis.set_ylabel("calls")
    axis.set_title("Status calls from Python while a batch runs")
    path = folder / "status_latency_under_load.png"
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    written.append(repository_path(path))
    return written
