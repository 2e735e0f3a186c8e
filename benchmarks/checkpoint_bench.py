"""What durable denoise state costs and saves (issue 19).

- Cost per image, by latent size (32, 64 and 512 px square latents, 4
  channels) and scheduler (the tiny SD model's own PNDM, and DPM++ 2M, whose
  history of model outputs travels with the image): bytes, time taken from
  the device thread (`DenoiseState.capture`: copies to host), time on the
  checkpoint writer (bytes, file, rename, SQLite row) and time to read,
  check and restore it onto the model (what a resumed image pays instead of
  recomputing its steps), beside what one step of that image costs (the
  restored image's own next step: denoiser forward and scheduler step).
- A kill -9 at a random point of a batch with the default budget (2 % of
  step time): real processes (`tests/helpers/crash_worker.py`), the steps
  each interrupted image computed twice, counted from the per-forward trace
  of both processes; for the images that resumed from a state, the steps
  they recomputed beside the bound the second worker reports itself
  (`steps_recomputed_at_most`); and the steps it saved.
- The step path before and after: images/s of a batch of 8 with durable
  state, checkpoints off and on (default budget).

    python -m benchmarks.checkpoint_bench [--model-cache DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from embedded_worker import ProcessingWorker, WorkerConfig
from embedded_worker.diffusion.conditioning import join_conditioning
from embedded_worker.diffusion.denoise import Cohort, encode_prompt, predict_noise
from embedded_worker.diffusion.denoise_state import DenoiseState
from embedded_worker.diffusion.families import adapter_for
from embedded_worker.diffusion.image_spec import ImageSpec
from embedded_worker.diffusion.schedulers import make_scheduler
from embedded_worker.lifecycle.checkpoints import Checkpoints
from embedded_worker.lifecycle.store import StateStore

from .common import median, table
from .worker_bench import MODEL, tiny_pipeline

CHECKPOINT_TITLE = ("Checkpoint cost per image (CPU; device thread = copies to host, writer = bytes + file + row; "
                    "restore against one step of the same image)")
KILL_TITLE = "kill -9 at a random point, default budget (real processes, 8 items of 20 steps, 2 in flight)"
STEP_PATH_TITLE = "The step path with checkpoints: batch of 8, 20 steps, durable state (img/s)"
ROOT = Path(__file__).resolve().parents[1]


def _cohort(pipe, side: int, scheduler_name: str, seed: int) -> Cohort:
    """One image at step 3 of 20, its latents `side` x `side`, stepped with random model outputs."""
    spec = ImageSpec(model_id=MODEL, prompt="a lighthouse", seed=seed, steps=20, width=side * 2, height=side * 2,
                     guidance_scale=1.0,
                     scheduler=scheduler_name)
    scheduler = make_scheduler(pipe, scheduler_name)
    scheduler.set_timesteps(20)
    generator = torch.Generator("cpu").manual_seed(seed)
    latents = torch.randn(1, 4, side, side, generator=generator)
    conditioning = join_conditioning([encode_prompt(pipe, spec)])
    cohort = Cohort(adapter_for(pipe), [None], [spec], scheduler, scheduler.timesteps, latents, conditioning,
                    [generator])
    for _ in range(3):
        cohort.advance(torch.randn(latents.shape, generator=generator))
    return cohort


def cost_rows(pipe, rounds: int) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        store = StateStore(Path(folder) / "state.sqlite3")
        checkpoints = Checkpoints(store, enabled=True)
        try:
            for side in (32, 64, 512):
                for name in ("default", "dpmpp_2m"):
                    cohort = _cohort(pipe, side, name, seed=side)
                    spec = cohort.specs[0]
                    checkpoints.name_images("bench", 0, [_Named()])
                    capture, write, restore, one_step, size = [], [], [], [], 0
                    for _ in range(rounds):
                        started = time.perf_counter()
                        (state,) = DenoiseState.capture(cohort)
                        capture.append(time.perf_counter() - started)
                        started = time.perf_counter()
                        checkpoints._write("bench", "0.0", state)
                        write.append(time.perf_counter() - started)
                        stored = checkpoints._index["bench"]["0.0"]
                        started = time.perf_counter()
                        restored = DenoiseState.from_bytes(stored.read()).restore(
                            pipe, None, spec, cohort.conditioning, torch.device("cpu"))
                        restore.append(time.perf_counter() - started)
                        if side <= 64:  # tiny SD's attention over a 512x512 latent takes minutes a step here
                            started = time.perf_counter()
                            predict_noise(pipe, [restored], max_rows=1)  # what each step not saved would cost
                            one_step.append(time.perf_counter() - started)
                        size = stored.path.stat().st_size
                    rows.append({"latents": f"4x{side}x{side}", "scheduler": type(cohort.scheduler).__name__,
                                 "bytes": size, "device_thread_ms": round(median(capture) * 1e3, 3),
                                 "writer_ms": round(median(write) * 1e3, 3),
                                 "read_and_restore_ms": round(median(restore) * 1e3, 3),
                                 "one_step_ms": round(median(one_step) * 1e3, 2) if one_step else None,
                                 "restore_in_steps": round(median(restore) / median(one_step), 3)
                                 if one_step else None})
        finally:
            checkpoints.close()
            store.close()
    return rows


class _Named:
    """A stand-in image for `name_images` (it names and looks up; nothing else is read)."""

    checkpoint_key = None
    resume_from = None


def _crash_worker(state_dir: Path, model_cache: str, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tests.helpers.crash_worker", str(state_dir), model_cache,
                             "bench", "8", "--trace-steps", "--steps", "20", "--model", MODEL, *extra], cwd=ROOT, stdout=subprocess.PIPE,
                            text=True)


def kill_rows(model_cache: str, rounds: int) -> tuple[list[dict], dict]:
    """Each round: kill -9 after a random number of forwards, then finish in a second process."""
    rows, rng = [], random.Random(19)
    for round_index in range(rounds):
        with tempfile.TemporaryDirectory() as folder:
            state = Path(folder)
            first = _crash_worker(state, model_cache)
            kill_after, forwards, reached = rng.randint(8, 60), 0, {}
            for line in first.stdout:
                message = json.loads(line)
                if "forward" in message:
                    reached[message["forward"]] = message["step"]
                    forwards += 1
                    if forwards >= kill_after:
                        break
            os.kill(first.pid, signal.SIGKILL)
            first.wait(timeout=60)
            started = time.perf_counter()
            second = _crash_worker(state, model_cache)
            resumed: dict[str, int] = {}  # record -> the step its first forward here started from
            total = 0  # the schedule's length: the highest step any image reached
            for line in second.stdout:
                message = json.loads(line)
                if "forward" in message:
                    resumed.setdefault(message["forward"], message["step"] - 1)
                    total = max(total, message["step"])
                if "final" in message:
                    status, counted = message["final"], message["checkpoints"]
            second.wait(timeout=600)
            seconds = time.perf_counter() - started
        interrupted = {r: s for r, s in reached.items() if r in resumed and s < total}
        recomputed = [interrupted[r] - resumed[r] for r in interrupted]
        from_states = [interrupted[r] - resumed[r] for r in interrupted if resumed[r] > 0]
        rows.append({"round": round_index + 1, "killed_after_forwards": kill_after,
                     "images_interrupted": len(interrupted),
                     "steps_reached": sum(interrupted.values()),
                     "steps_saved": sum(resumed[r] for r in interrupted),
                     "steps_recomputed": sum(recomputed), "most_recomputed_per_image": max(recomputed, default=0),
                     "recomputed_after_a_state": sum(from_states),
                     "worker_bound_after_a_state": counted["steps_recomputed_at_most"],
                     "items_completed": status["processed_items"], "second_process_s": round(seconds, 2)})
    return rows, {}


def step_path_rows(model_cache: str, rounds: int) -> list[dict]:
    """Batches of 8 on a durable worker, checkpoints off and on, alternating."""
    results: dict[str, list[float]] = {"off": [], "on": []}
    intervals, shares = [], []
    with tempfile.TemporaryDirectory() as folder:
        for round_index in range(rounds):
            for mode in ("off", "on"):
                config = WorkerConfig(model_cache_dir=model_cache, default_model=MODEL,
                                      state_path=str(Path(folder) / f"{mode}{round_index}.sqlite3"),
                                      scheduling={"max_batch_size": 8, "coalesce_wait_ms": 50},
                                      checkpoints={"enabled": mode == "on"})
                with ProcessingWorker(config) as worker:
                    parameters = {"prompt": "a lighthouse", "steps": 20, "width": 32, "height": 32, "seed": 1,
                                  "total_images": 8}
                    worker.execute_batch(workflow_id="img-generation-basic", background=False, parameters=parameters)
                    started = time.perf_counter()
                    worker.execute_batch(workflow_id="img-generation-basic", background=False, parameters=parameters)
                    results[mode].append(8 / (time.perf_counter() - started))
                    device = worker.get_status()["device"]["devices"][0]
                    taken = device["checkpoints"]
                    if taken is not None and taken["capture_seconds_per_image"] is not None:
                        write = worker.get_status()["state"]["checkpoints"]["seconds_per_image"] or 0.0
                        intervals.append(taken["interval_steps"])
                        cost = (taken["capture_seconds_per_image"] + write) * 8
                        shares.append(cost / (taken["interval_steps"] * device["seconds_per_step"]))
    off, on = median(results["off"]), median(results["on"])
    return [{"checkpoints": "off", "images_per_s": round(off, 2), "change_pct": 0.0, "interval_steps": None,
             "measured_share_pct": None},
            {"checkpoints": "on (2 % budget)", "images_per_s": round(on, 2),
             "change_pct": round((on - off) / off * 100, 1),
             "interval_steps": median(intervals) if intervals else None,
             "measured_share_pct": round(median(shares) * 100, 2) if shares else None}]


def checkpoint_sections(model_cache: str, rounds: int) -> dict[str, list[dict]]:
    pipe = tiny_pipeline(model_cache)
    kills, _ = kill_rows(model_cache, max(2, rounds // 2))
    return {CHECKPOINT_TITLE: cost_rows(pipe, rounds), KILL_TITLE: kills,
            STEP_PATH_TITLE: step_path_rows(model_cache, max(2, rounds // 2))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-cache", default=str(Path(tempfile.gettempdir()) / "embedded_worker_bench_models"))
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    for title, rows in checkpoint_sections(args.model_cache, args.rounds).items():
        print(table(title, rows))


if __name__ == "__main__":
    main()
