"""A worker process for crash tests: it runs (or resumes) one batch and reports as items complete.

    python -m tests.helpers.crash_worker STATE_DIR MODEL_CACHE BATCH_ID COUNT [--poison PROMPT]
        [--every-steps K] [--trace-steps] [--hold-at-step N] [--steps N] [--model ID]

One JSON line per completed item ({"item": ..., "seed": ..., "output_id": ..., "sha256": ...}), then
{"final": status reply, "checkpoints": the device's checkpoint counters}. --every-steps checkpoints each image every K steps; --trace-steps adds a line per
image per forward ({"forward": record id, "step": its step after it}); --hold-at-step holds the device
thread for good once an image reaches step N (after saying {"held": N}), so a test can kill -9 the
process at that boundary. With --poison, the process kills itself (os._exit, as a native crash would)
the moment an image with that prompt starts denoising: a fault injector for what a bad model or
driver does, since nothing here crashes on its own.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import threading

from embedded_worker import ProcessingWorker, WorkerConfig, testing


def inject_poison(prompt: str) -> None:
    from embedded_worker.diffusion import active_set

    start = active_set.start_cohort

    def start_or_die(pipe, members, specs, conditioning):
        if any(spec.prompt == prompt for spec in specs):
            os._exit(9)
        return start(pipe, members, specs, conditioning)

    active_set.start_cohort = start_or_die


def trace(device, each_forward: bool, hold: int | None, printing: threading.Lock) -> None:
    """A step hook: the forward each image just took, then, at step `hold`, the device held for good."""
    steps = [(task.record_id, cohort.step_index) for cohort in device.active.cohorts for task in cohort.members]
    with printing:
        if each_forward:
            for record_id, step in steps:
                print(json.dumps({"forward": record_id, "step": step}), flush=True)
        held = hold is not None and any(step == hold for _, step in steps)
        if held:
            print(json.dumps({"held": hold}), flush=True)
    if held:
        threading.Event().wait()


def main(argv: list[str]) -> int:
    state_dir, model_cache, batch_id, count = argv[:4]
    if "--poison" in argv:
        inject_poison(argv[argv.index("--poison") + 1])
    every = int(argv[argv.index("--every-steps") + 1]) if "--every-steps" in argv else None
    steps = int(argv[argv.index("--steps") + 1]) if "--steps" in argv else 8
    config = WorkerConfig(model_cache_dir=model_cache, state_path=os.path.join(state_dir, "state.sqlite3"),
                          scheduling={"max_batch_size": 2, "coalesce_wait_ms": 0},
                          checkpoints={"every_steps": every} if every else {},
                          **({"default_model": argv[argv.index("--model") + 1]} if "--model" in argv else {}))
    printing = threading.Lock()  # trackers call back from two pool threads at once, the device from its own
    with ProcessingWorker(config) as worker:
        if "--trace-steps" in argv or "--hold-at-step" in argv:
            hold = int(argv[argv.index("--hold-at-step") + 1]) if "--hold-at-step" in argv else None
            testing.on_step(worker, lambda device: trace(device, "--trace-steps" in argv, hold, printing))
        items = [{"item_id": f"item-{i:02d}",
                  "parameters": {"seed": 500 + i, "prompt": "poison" if "--poison" in argv and i == 3 else "calm"}}
                 for i in range(int(count))]
        worker.execute_batch(batch_id=batch_id, workflow_id="img-generation-basic", items=items,
                             parameters={"steps": steps})  # a restart finds the stored batch: the same id runs once
        reported: set[str] = set()

        def report(figures: dict) -> None:
            with printing:
                print_new(worker.get_batch_status(batch_id=batch_id))

        def print_new(status: dict) -> None:
            for output in status["outputs"]:
                if output["output_id"] not in reported:
                    reported.add(output["output_id"])
                    digest = hashlib.sha256(worker.get_output(output["output_id"]).tobytes()).hexdigest()
                    print(json.dumps({"item": output["item_id"], "seed": output["seed"],
                                      "output_id": output["output_id"], "sha256": digest}), flush=True)

        with worker.track_batch(batch_id, on_update=report) as tracker:
            tracker.wait(timeout=600)
        report({})
        print(json.dumps({"final": worker.get_batch_status(batch_id=batch_id, include_items=True),
                          "checkpoints": worker.get_status()["device"]["devices"][0]["checkpoints"]}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
