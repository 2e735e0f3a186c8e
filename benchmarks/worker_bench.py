"""The worker from Python: status-call latency, and throughput against the raw diffusers pipeline."""

from __future__ import annotations

import time

import torch

from embedded_worker import ProcessingWorker, WorkerConfig, testing
from embedded_worker.diffusion.models import ModelCatalog, load_pipeline

from .common import median, percentiles

PROMPT = "a lighthouse on a cliff at sunset"
MODEL = "builtin:tiny-sd"  # named, not the worker's default: figures stay comparable when the default changes


def make_worker(model_cache: str, state_path: str = ":memory:", **scheduling) -> ProcessingWorker:
    return ProcessingWorker(WorkerConfig.model_validate({"model_cache_dir": model_cache, "state_path": state_path,
                                                         "default_model": MODEL,
                                                         "scheduling": {"coalesce_wait_ms": 5.0, **scheduling}}))


def status_latency(worker: ProcessingWorker, seconds: float, load: bool, samples: list | None = None) -> dict:
    """Time get_session_status calls for `seconds`, with or without a batch on the device."""
    done = worker.execute_workflow(session_id="probe", workflow_id="img-generation-basic", background=False,
                                   parameters={"prompt": PROMPT, "steps": 4, "seed": 1})
    assert done["status"] == "completed"
    batch_id = None
    if load:
        batch_id = "load"
        worker.execute_batch(batch_id=batch_id, workflow_id="img-generation-basic",
                             parameters={"prompt": PROMPT, "steps": 40, "seed": 0, "total_images": 400})
        while worker.get_batch_status(batch_id=batch_id)["running_items"] == 0:
            time.sleep(0.01)
    samples = [] if samples is None else samples
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        started = time.perf_counter()
        reply = worker.get_session_status(session_id="probe")
        samples.append(time.perf_counter() - started)
        assert reply["success"]
    busy = load and worker.get_batch_status(batch_id=batch_id)["running_items"] > 0
    if batch_id:
        worker.delete_batch(batch_id=batch_id)
    worker.delete_session(session_id="probe")
    return {"condition": "while a batch runs" if load else "idle", **percentiles(samples),
            "device_busy_throughout": busy if load else "n/a"}


def raw_pipeline_rate(pipe, batch: int, steps: int, rounds: int, size: int = 32, **call) -> list[float]:
    """`call`: what else the pipeline is given (a transformer family's guidance_scale, max_sequence_length)."""
    rates = []
    for round_index in range(rounds):
        generators = [torch.Generator().manual_seed(round_index * batch + i) for i in range(batch)]
        started = time.perf_counter()
        pipe([PROMPT] * batch, generator=generators, num_inference_steps=steps, height=size, width=size,
             output_type="np", **call)
        rates.append(batch / (time.perf_counter() - started))
    return rates


def worker_rate(worker: ProcessingWorker, batch: int, steps: int, rounds: int, **parameters) -> list[float]:
    """`parameters`: what else the workflow is given (model, guidance_scale, size)."""
    rates = []
    for round_index in range(rounds):
        started = time.perf_counter()
        reply = worker.execute_batch(workflow_id="img-generation-basic", background=False, parameters={
            "prompt": PROMPT, "steps": steps, "seed": round_index * batch, "total_images": batch, **parameters})
        rates.append(batch / (time.perf_counter() - started))
        assert reply["status"] == "completed", reply
        worker.delete_batch(batch_id=reply["batch_id"])
    return rates


def throughput_against_pipeline(model_cache: str, batches=(1, 8), steps: int = 20, rounds: int = 6) -> list[dict]:
    """Images/s through the worker and through the pipeline's own call, interleaved round by round."""
    pipe = tiny_pipeline(model_cache)
    rows = []
    for batch in batches:
        worker = make_worker(model_cache, max_batch_size=batch, coalesce_wait_ms=50.0)
        try:
            raw_pipeline_rate(pipe, batch, steps, 1)  # warm both
            worker_rate(worker, batch, steps, 1)
            raw, ours = [], []
            for _ in range(rounds):
                raw += raw_pipeline_rate(pipe, batch, steps, 1)
                ours += worker_rate(worker, batch, steps, 1)
        finally:
            worker.close(30)
        raw_rate, our_rate = median(raw), median(ours)
        rows.append({"batch": batch, "steps": steps, "pipeline_img_s": round(raw_rate, 2),
                     "worker_img_s": round(our_rate, 2),
                     "overhead_pct": round(100 * (raw_rate - our_rate) / raw_rate, 1),
                     "rounds": rounds})
    return rows


def status_rows(model_cache: str, seconds: float, loaded_samples: list) -> list[dict]:
    """Idle and under load; the loaded samples (seconds) are kept for the histogram."""
    worker = make_worker(model_cache)
    try:
        return [status_latency(worker, seconds, load=False),
                status_latency(worker, seconds, load=True, samples=loaded_samples)]
    finally:
        worker.close(30)


def tiny_pipeline(model_cache: str):
    folder = ModelCatalog({}, model_cache).folder(MODEL)
    return load_pipeline(folder, torch.device("cpu"), torch.float32)


def durability_rows(model_cache: str, rounds: int, batch: int = 8, steps: int = 20) -> list[dict]:
    """What the durable store costs: the same batches with state in SQLite (and files synced) or in memory."""
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        durable = make_worker(model_cache, state_path=f"{folder}/state.sqlite3", max_batch_size=batch,
                              coalesce_wait_ms=50.0)
        memory = make_worker(model_cache, max_batch_size=batch, coalesce_wait_ms=50.0)
        try:
            worker_rate(durable, batch, steps, 1)
            worker_rate(memory, batch, steps, 1)
            on_disk, in_memory = [], []
            for _ in range(rounds):
                on_disk += worker_rate(durable, batch, steps, 1)
                in_memory += worker_rate(memory, batch, steps, 1)
            writes = _time_output_writes(durable)
        finally:
            durable.close(30)
            memory.close(30)
    disk_rate, memory_rate = median(on_disk), median(in_memory)
    return [{"state": "in memory", "img_s": round(memory_rate, 2), "cost_pct": 0.0, "per_output_write_ms": None},
            {"state": "SQLite + files synced", "img_s": round(disk_rate, 2),
             "cost_pct": round(100 * (memory_rate - disk_rate) / memory_rate, 1),
             "per_output_write_ms": round(writes * 1000, 2)}]


def _time_output_writes(worker: ProcessingWorker, count: int = 50) -> float:
    """Seconds to keep one 32x32 output durably: raw pixels and PNG written and fsync'd, a row committed."""
    import numpy as np

    pixels = np.zeros((32, 32, 3), dtype=np.uint8)
    started = time.perf_counter()
    for _ in range(count):
        testing.output_store(worker).add("bench-writes", pixels, metadata={"prompt": PROMPT})
    elapsed = (time.perf_counter() - started) / count
    testing.output_store(worker).release("bench-writes")
    return elapsed
