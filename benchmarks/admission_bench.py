"""What one admission decision costs against how many owners wait: the device thread holds the queue's lock
for it, so submits, pauses and cancels wait on it too.

The scenario: a device full with eight images of eight owners (one image each, all the same priority);
N other owners wait with one image each. Every step boundary the device worker calls `Admission.decide`
under the queue's condition lock: it asks whether another forward key outranks the set, which preferences
apply, and (with `preempt`) who the next waiting images would be and whether any displaces an active one.
Here nobody does, so each call leaves the queue as it found it and the same decision repeats. Only the
queue, the admission and their tasks are built: no model, no device.

    python -m benchmarks.admission_bench [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import time

from embedded_worker.diffusion.admission import Admission
from embedded_worker.diffusion.denoise import ImageSpec
from embedded_worker.diffusion.memory import BatchSizer
from embedded_worker.diffusion.task import BatchSizing, DenoiseTask
from embedded_worker.diffusion.work_queue import WorkQueue

from .common import table

OWNERS = (1, 1_000, 4_000)
ACTIVE = 8
ADMISSION_TITLE = "Admission: one decide() under the queue lock against owners waiting (full device, fair policy)"


class _NoMemoryLimit:
    """A monitor that never bounds the size: the configured capacity decides."""

    def recommend(self, key, threshold):
        return None


def _task(owner: str, at: float) -> DenoiseTask:
    return DenoiseTask(ImageSpec(model_id="m", prompt=owner), 5, sizing=BatchSizing(owner, 8), submitted_at=at)


def _admission(queue: WorkQueue) -> Admission:
    return Admission(queue, BatchSizer(_NoMemoryLimit(), ACTIVE), 0.0, True, 2)


def decide_seconds(owners: int, calls: int) -> list[float]:
    """Seconds per decide() with `owners` waiting behind a full device."""
    queue = WorkQueue(aging_per_second=0.1, policy="fair")
    active = []
    for index in range(ACTIVE):
        task = _task(f"on-device-{index}", float(index))
        task.step, task.total_steps = 5, 20
        active.append(task)
    for index in range(owners):
        queue.put(_task(f"waiting-{index}", 100.0 + index))
    admission = _admission(queue)
    admission.key = active[0].spec.forward_key()
    samples = []
    with queue.cond:
        for _ in range(calls):
            started = time.perf_counter()
            taken, _wait = admission.decide(active)
            samples.append(time.perf_counter() - started)
            assert taken == [], "a full device with nobody to displace admits nothing"
    return samples


def admission_rows(quick: bool = False) -> list[dict]:
    rows = []
    for owners in OWNERS:
        calls = max(20, (200 if quick else 2000) // max(1, owners // 100))
        samples = sorted(decide_seconds(owners, calls))
        rows.append({"owners_waiting": owners, "calls": calls,
                     "decide_p50_ms": round(statistics.median(samples) * 1e3, 4),
                     "decide_p99_ms": round(samples[min(len(samples) - 1, int(0.99 * len(samples)))] * 1e3, 4)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    print(table(ADMISSION_TITLE, admission_rows(args.quick)))


if __name__ == "__main__":
    main()
