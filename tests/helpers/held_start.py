"""A host process whose device side is held at the start of its imports, for the light-start tests.

    python -m tests.helpers.held_start MODEL_CACHE HOW

The device side's start thread waits (before it imports torch, diffusers or transformers) until this
process lets it go, so what the worker's import and construction imported is read without a race. HOW:
"queue" (a session submitted while the devices start, then let go: it must run), or "close" (closed while
held, then let go: the close must end the start). Prints one JSON line.
"""

from __future__ import annotations

import json
import sys
import threading
import time

HEAVY = ("torch", "diffusers", "transformers")


def main(argv: list[str]) -> int:
    model_cache, how = argv
    from embedded_worker.diffusion import offline

    held = threading.Event()
    quiet_libraries = offline.quiet_libraries

    def held_back() -> None:
        held.wait()
        quiet_libraries()

    offline.quiet_libraries = held_back
    from embedded_worker import ProcessingWorker, testing

    worker = ProcessingWorker({"model_cache_dir": model_cache, "state_path": ":memory:", "workflows_dir": None,
                               "default_model": "builtin:tiny-sd"})
    report: dict = {"imported": [name for name in HEAVY if name in sys.modules],
                    "device_status": worker.execute("device.get_status", {})}
    if how == "queue":
        submitted = worker.execute_workflow(workflow_id="img-generation-basic", session_id="early",
                                            parameters={"prompt": "early", "steps": 2, "seed": 1})
        report["submitted"] = submitted["success"]
        report["before"] = worker.get_session_status(session_id="early")["status"]
        held.set()
        report["after"] = until(lambda: worker.get_session_status(session_id="early")["status"],
                                ("completed", "failed", "cancelled"))
    else:
        closing = threading.Thread(target=lambda: report.update(close=worker.close(timeout=60)))
        closing.start()
        until(lambda: testing.device_side_closed(worker), (True,))  # closed while held: the start must see it
        held.set()
        closing.join()
        report["workers"] = len(testing.device_workers(worker))
    print(json.dumps(report), flush=True)
    worker.close()
    return 0


def until(read, wanted: tuple, timeout: float = 300.0):
    deadline = time.monotonic() + timeout
    while (value := read()) not in wanted and time.monotonic() < deadline:
        time.sleep(0.01)
    return value


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
