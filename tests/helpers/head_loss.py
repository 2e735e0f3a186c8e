"""A worker process whose Ray head is killed mid-batch, for the head-loss tests (issue 23).

    python -m tests.helpers.head_loss MODEL_CACHE (local_devices|cluster_only)
    python -m tests.helpers.head_loss MODEL_CACHE private ROUNDS


Its own head on 127.0.0.1 (SIGKILLed as a whole process group while images are out on the actor), one actor,
`head_check_s` 0.2. After the batch settles it waits past the point where Ray would have ended the process
(its reconnect timeout, from the environment this process was started with), runs more work, starts a head
again on the same port and runs a batch once the worker is back on it. `private`: the worker's own head
("local"), killed mid-batch ROUNDS times; the worker starts it again each time. Prints one JSON line per
head ({"head_pgid": N}: the test stops what is left) and one with what it saw.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time

from embedded_worker import ProcessingWorker, WorkerConfig, testing
from embedded_worker.cluster.local_head import LocalRayHead

SMALL = {"prompt": "a lighthouse at dusk", "width": 32, "height": 32}


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"not within {timeout} s: {what}")


def start_head(port: int | None = None) -> LocalRayHead:
    head = LocalRayHead(num_cpus=2, port=port)
    head.start(timeout=60)
    print(json.dumps({"head_pgid": head.process.pid}), flush=True)
    return head


def batch(worker, batch_id: str, seed: int, steps: int, images: int = 8) -> None:
    reply = worker.execute_batch(batch_id=batch_id, workflow_id="img-generation-basic", background=True,
                                 parameters={**SMALL, "steps": steps, "seed": seed, "total_images": images})
    assert reply["success"], reply


def settled(worker, batch_id: str) -> dict:
    wait_for(lambda: worker.get_batch_status(batch_id=batch_id)["status"] in ("completed", "failed", "partial",
                                                                             "cancelled"), 240, batch_id)
    final = worker.get_batch_status(batch_id=batch_id, include_items=True)
    return {"status": final["status"], "processed": final["processed_items"], "failed": final["failed_items"],
            "seeds": sorted(o["seed"] for item in final["items"] for o in item.get("outputs", [])),
            "errors": sorted({str(item.get("error_code")) for item in final["items"] if item.get("error_code")})}


def images_done(worker) -> dict:
    return {w.name: w.counters.images_done for w in testing.device_workers(worker)}


def warm(worker, remote) -> None:
    """A fresh actor loads a model with its first image: loaded first, it takes its share of the next batch
    instead of leaving it all to the local device while it imports (a loaded machine showed that)."""
    reply = worker.execute("model.load_model", {"model_id": "builtin:tiny-sd"})
    assert reply["success"], reply
    wait_for(lambda: remote.status()["loaded_models"], 180, "the fresh actor loads the model")


def back_on_the_head(worker, remote) -> dict:
    """Once reconnected: the fresh actor ready and warm, a batch runs with it taking a share."""
    wait_for(lambda: remote.node_id is not None, 180, "a fresh actor is ready")
    warm(worker, remote)
    before = remote.counters.images_done
    batch(worker, "back", 950, steps=10, images=16)  # more than the local device admits at once: both take some
    return {"back": settled(worker, "back"), "actor_took_work_again": remote.counters.images_done > before,
            "cluster_at_end": worker.get_status()["device"]["cluster"]}


def worker_on(model_cache: str, address: str, local_devices: bool) -> ProcessingWorker:
    return ProcessingWorker(WorkerConfig.model_validate({
        "model_cache_dir": model_cache, "workflows_dir": None, "state_path": ":memory:",
        # the local device admits at most 4 at once, so of a batch of 8 the actor always gets some (a batch
        # accepted within the coalescing wait all went to the local device: nothing out on the actor)
        "default_model": "builtin:tiny-sd", "scheduling": {"coalesce_wait_ms": 5.0, "max_batch_size": 4},
        "cluster": {"address": address, "actors": 1, "cpus_per_actor": 1, "in_flight_per_actor": 4,
                    "local_devices": local_devices, "head_check_s": 0.2}}))


def private_rounds(model_cache: str, rounds: int) -> int:
    worker = worker_on(model_cache, "local", local_devices=True)
    connection = testing.cluster(worker)
    remote = next(w for w in testing.device_workers(worker) if w.name.startswith("ew-ray-"))
    seen: dict = {"rounds": []}
    try:
        for round in range(rounds):
            print(json.dumps({"head_pgid": connection.head.process.pid}), flush=True)
            if round == 0:  # the start loads the model on the actor, which takes no image meanwhile
                wait_for(lambda: remote.status()["loaded_models"], 180, "the actor loads the model")
            wait_for(lambda: remote.node_id is not None, 180, "the actor is ready")
            batch(worker, f"round-{round}", 1000 + 10 * round, steps=12)
            wait_for(lambda: remote.active_images > 0, 120, "images out on the actor")
            out = remote.active_images
            os.killpg(connection.head.process.pid, signal.SIGKILL)
            seen["rounds"].append({"out_on_actor_at_kill": out, **settled(worker, f"round-{round}")})
            wait_for(lambda: worker.get_status()["device"]["cluster"]["state"] == "connected", 180, "reconnected")
        print(json.dumps({"head_pgid": connection.head.process.pid}), flush=True)
        seen |= back_on_the_head(worker, remote)
    finally:
        seen["closed"] = worker.close(timeout=60)["success"]
        print(json.dumps(seen), flush=True)
    return 0


def main(argv: list[str]) -> int:
    model_cache, mode = argv[0], argv[1]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(threadName)s %(name)s: %(message)s")
    if mode == "private":
        return private_rounds(model_cache, int(argv[2]))
    ray_would_end_after_s = float(os.environ.get("RAY_gcs_rpc_server_reconnect_timeout_s", "60"))
    head = start_head()
    worker = worker_on(model_cache, head.address, local_devices=mode == "local_devices")
    seen: dict = {}
    try:
        remote = next(w for w in testing.device_workers(worker) if w.name.startswith("ew-ray-"))
        wait_for(lambda: remote.status()["loaded_models"], 180, "the actor loads the model")

        batch(worker, "cut", 900, steps=60)  # long enough that the actor cannot finish before the kill
        wait_for(lambda: remote.active_images > 0, 120, "images out on the actor")
        seen["out_on_actor_at_kill"] = remote.active_images
        seen["done_before_kill"] = images_done(worker)
        os.killpg(head.process.pid, signal.SIGKILL)
        head.process.wait()
        seen["cut"] = settled(worker, "cut")
        seen["done_after_cut"] = images_done(worker)
        seen["cluster_after_cut"] = worker.get_status()["device"]["cluster"]
        seen["device_get_status"] = worker.execute("device.get_status", {}).get("cluster")

        time.sleep(3 * ray_would_end_after_s)  # past the point where Ray would have ended this process
        later = worker.execute_workflow(workflow_id="img-generation-basic", session_id="later", background=True,
                                        parameters={**SMALL, "steps": 4, "seed": 1})
        seen["later"] = {"accepted": later["success"], "error_code": later.get("error_code")}
        if later["success"]:
            wait_for(lambda: worker.get_session_status(session_id="later").get("status") in ("completed", "failed"),
                     120, "the later session ends")
            final = worker.get_session_status(session_id="later")
            seen["later"] |= {"status": final["status"], "error_code": final.get("error_code")}
        seen["status_still_answers"] = worker.get_status()["success"]

        head = start_head(head.port)
        wait_for(lambda: worker.get_status()["device"]["cluster"]["state"] == "connected", 180, "reconnected")
        seen |= back_on_the_head(worker, remote)
    finally:
        seen["closed"] = worker.close(timeout=60)["success"]
        head.stop()
        print(json.dumps(seen), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
