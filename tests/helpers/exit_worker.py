"""A worker process for exit tests: a long session on the device, then the interpreter exits.

    python -m tests.helpers.exit_worker MODEL_CACHE STATE_PATH HOW

HOW is how the host ends: "no-close" (it never calls close), "refused-close" (its close is refused for a
timeout that is not a number), or "close" (close(0) while the step runs). Prints one JSON line with the
close's reply, then returns from main while the device thread is inside a step (unless closed). A device
thread still inside torch when the interpreter finalizes aborts the process (exit code 134).
"""

from __future__ import annotations

import json
import sys
import time

from embedded_worker import ProcessingWorker, WorkerConfig, testing


def main(argv: list[str]) -> int:
    model_cache, state_path, how = argv
    worker = ProcessingWorker(WorkerConfig(model_cache_dir=model_cache, state_path=state_path,
                                           default_model="builtin:tiny-sd"))
    reply = worker.execute_workflow(workflow_id="img-generation-basic", session_id="long",
                                    parameters={"prompt": "a long one", "steps": 150, "num_images": 4, "seed": 1})
    assert reply["success"], reply
    device = testing.device_workers(worker)[0]
    while device.counters.forwards < 2:  # the device is stepping: its thread is inside torch from now on
        time.sleep(0.01)
    closed = None
    if how == "refused-close":
        closed = worker.close(timeout=float("nan"))
        assert closed["error_code"] == "invalid_request", closed
    elif how == "close":
        closed = worker.close(timeout=0)
    print(json.dumps({"close": closed, "forwards": device.counters.forwards}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
