"""A worker process for close tests: close() during a long session, then a normal interpreter exit.

    python -m tests.helpers.close_worker MODEL_CACHE TIMEOUT PENDING

Prints one JSON line: close's reply and the device threads still alive after it. A device thread that
outlived close() aborts the process at exit (exit code 134), which the test sees.
"""

from __future__ import annotations

import json
import sys
import threading

from embedded_worker import ProcessingWorker, WorkerConfig, testing


def main(argv: list[str]) -> int:
    model_cache, timeout, pending = argv[0], float(argv[1]), argv[2]
    worker = ProcessingWorker(WorkerConfig(model_cache_dir=model_cache, state_path=":memory:",
                                                  default_model="builtin:tiny-sd"))
    reply = worker.execute_workflow(workflow_id="img-generation-basic", session_id="long",
                                    parameters={"prompt": "a long one", "steps": 150, "num_images": 4, "seed": 1})
    assert reply["success"], reply
    testing.wait_until(worker, lambda: worker.get_session_status("long")["status"] == "running", 120)
    closed = worker.close(timeout=timeout, pending=pending)
    alive = [t.name for t in threading.enumerate() if t.name.startswith("ew-") and t.is_alive()]
    print(json.dumps({"close": closed, "alive": alive, "again": worker.close(timeout=timeout)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
