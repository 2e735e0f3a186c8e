"""Per model family: the worker against the family's own pipeline call, and coalescing, on tiny models.

For each transformer family (and SD beside them, for reference): images/s
through the worker and through the pipeline's own call at batch 1 and 8,
interleaved round by round; then eight concurrent single-image sessions
(coalesced into shared forwards) against the same eight one by one and the
raw batch of 8. The goals are SD's: under 5% overhead against the pipeline,
coalesced within 5% of the raw batch.

    python -m benchmarks.run --only families
"""

from __future__ import annotations

import torch

from embedded_worker import testing
from embedded_worker.diffusion.families import chroma, flux, stable_diffusion_3
from embedded_worker.diffusion.models import ModelCatalog, load_pipeline, read_family

from .coalescing_bench import concurrent_rate, sequential_rate
from .common import median
from .worker_bench import make_worker, raw_pipeline_rate, worker_rate

MODELS = ("builtin:tiny-sd", "builtin:tiny-flux", "builtin:tiny-flux-schnell", "builtin:tiny-sd3",
          "builtin:tiny-chroma")
STEPS = 20
GUIDANCE = 3.5  # guided on every family: Flux dev embeds it, SD3 and Chroma double their rows for it
SEQUENCE_LENGTH = {"flux": flux.max_sequence_length, "sd3": stable_diffusion_3.max_sequence_length,
                   "chroma": chroma.max_sequence_length}
THROUGHPUT_TITLE = f"Per family: images/s, worker vs the family's pipeline call (tiny models, 32 px, {STEPS} steps, CPU)"
COALESCING_TITLE = "Per family: eight concurrent single-image sessions coalesced, one by one, raw batch 8"


def family_pipeline(model_cache: str, model_id: str):
    """(pipe, what its call takes beside the common arguments) for a tiny model."""
    folder = ModelCatalog({}, model_cache).folder(model_id)
    pipe = load_pipeline(folder, torch.device("cpu"), torch.float32)
    family = read_family(folder)
    call = {"guidance_scale": GUIDANCE}
    if family in SEQUENCE_LENGTH:
        call["max_sequence_length"] = SEQUENCE_LENGTH[family](pipe)
    return pipe, family, call


def family_rows(model_cache: str, rounds: int) -> tuple[list[dict], list[dict]]:
    throughput, coalescing = [], []
    for model_id in MODELS:
        pipe, family, call = family_pipeline(model_cache, model_id)
        parameters = {"model": model_id, "guidance_scale": GUIDANCE, "width": 32, "height": 32}
        for batch in (1, 8):
            worker = make_worker(model_cache, max_batch_size=batch, coalesce_wait_ms=50.0)
            try:
                raw_pipeline_rate(pipe, batch, STEPS, 1, **call)  # warm both
                worker_rate(worker, batch, STEPS, 1, **parameters)
                raw, ours = [], []
                for _ in range(rounds):
                    raw += raw_pipeline_rate(pipe, batch, STEPS, 1, **call)
                    ours += worker_rate(worker, batch, STEPS, 1, **parameters)
            finally:
                worker.close(30)
            raw_rate, our_rate = median(raw), median(ours)
            throughput.append({"model": model_id, "family": family, "batch": batch,
                               "pipeline_img_s": round(raw_rate, 2), "worker_img_s": round(our_rate, 2),
                               "overhead_pct": round(100 * (raw_rate - our_rate) / raw_rate, 1), "rounds": rounds})
        worker = make_worker(model_cache, max_batch_size=8)
        try:
            forwards_before = testing.device_workers(worker)[0].counters.forwards
            concurrent_rate(worker, 8, 0, **parameters)  # warm
            together, alone, raw = [], [], []
            for index in range(rounds):
                together.append(concurrent_rate(worker, 8, 100 * index, **parameters))
                alone.append(sequential_rate(worker, 8, 100 * index, **parameters))
                raw += raw_pipeline_rate(pipe, 8, STEPS, 1, **call)
            forwards = testing.device_workers(worker)[0].counters.forwards - forwards_before
        finally:
            worker.close(30)
        coalesced, one_by_one, raw_batch = median(together), median(alone), median(raw)
        coalescing.append({"model": model_id, "family": family, "coalesced_img_s": round(coalesced, 2),
                           "one_by_one_img_s": round(one_by_one, 2), "raw_batch_8_img_s": round(raw_batch, 2),
                           "coalesced_vs_one_by_one": round(coalesced / one_by_one, 2),
                           "coalesced_vs_raw_batch_pct": round(100 * (coalesced / raw_batch - 1), 1),
                           "forwards": forwards, "images": 8 * (2 * rounds + 1), "rounds": rounds})
    return throughput, coalescing
