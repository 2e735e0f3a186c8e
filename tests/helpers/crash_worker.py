"""A worker process for crash tests: it runs (or resumes) one batch and reports as items complete.

    python -m tests.helpers.crash_worker STATE_DIR MODEL_CACHE BATCH_ID COUNT [--poison PROMPT]

One JSON line per completed item ({"item": ..., "seed": ..., "output_id": ..., "sha256": ...}), then
{"final": status reply}. With --poison, the process kills itself (os._exit, as a native crash would)
the moment an image with that prompt starts denoising: a fault injector for what a bad model or
driver does, since nothing here crashes on its own.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import threading

from embedded_worker import ProcessingWorker, WorkerConfig


def inject_poison(prompt: str) -> None:
    from embedded_worker.diffusion import active_set

    start = active_set.start_cohort

    def start_or_die(pipe, members, specs, conditioning):
        if any(spec.prompt == prompt for spec in specs):
            os._exit(9)
        return start(pipe, members, specs, conditioning)

    active_set.start_cohort = start_or_die


def main(argv: list[str]) -> int:
    state_dir, model_cache, batch_id, count = argv[:4]
    if "--poison" in argv:
        inject_poison(argv[argv.index("--poison") + 1])
    config = WorkerConfig(model_cache_dir=model_cache, state_path=os.path.join(state_dir, "state.sqlite3"),
                          scheduling={"max_batch_size": 2, "coalesce_wait_ms": 0})
    with ProcessingWorker(config) as worker:
        items = [{"item_id": f"item-{i:02d}",
                  "parameters": {"seed": 500 + i, "prompt": "poison" if "--poison" in argv and i == 3 else "calm"}}
                 for i in range(int(count))]
        worker.execute_batch(batch_id=batch_id, workflow_id="img-generation-basic", items=items,
                             parameters={"steps": 8})  # a restart finds the stored batch: the same id runs once
        reported: set[str] = set()
        printing = threading.Lock()  # trackers call back from two pool threads at once

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
        print(json.dumps({"final": worker.get_batch_status(batch_id=batch_id, include_items=True)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
