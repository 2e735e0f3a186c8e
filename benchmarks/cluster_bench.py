"""Past one machine: the same batch on the local device, on one Ray actor and on two (issue 10).

A private Ray head on this machine (2 CPUs), actors of 1 CPU each. On a
2-core machine two actors share the cores the local device uses alone, so
expect little scaling here: the rows show the cluster path's overhead and
its per-image cost of bringing pixels back, not a GPU cluster's speed-up.
"""

from __future__ import annotations

import time

import numpy as np

from .common import median
from .worker_bench import MODEL, PROMPT

ITEMS, STEPS, SIDE = 16, 10, 32
CLUSTER_TITLE = f"A {ITEMS}-item batch ({STEPS} steps, {SIDE} px): local device vs Ray actors on this machine"


def _worker(model_cache: str, cluster: dict | None):
    from embedded_worker import ProcessingWorker, WorkerConfig

    settings = {"model_cache_dir": model_cache, "state_path": ":memory:", "default_model": MODEL,
                "scheduling": {"coalesce_wait_ms": 5.0}}
    if cluster is not None:
        settings["cluster"] = cluster
    return ProcessingWorker(WorkerConfig.model_validate(settings))


def _batch_rate(worker, batch_id: str) -> float:
    started = time.perf_counter()
    reply = worker.execute_batch(batch_id=batch_id, workflow_id="img-generation-basic", background=False,
                                 parameters={"prompt": PROMPT, "steps": STEPS, "width": SIDE, "height": SIDE,
                                             "seed": 1, "total_images": ITEMS})
    assert reply["status"] == "completed" and reply["processed_items"] == ITEMS, reply
    worker.delete_batch(batch_id=batch_id)
    return ITEMS / (time.perf_counter() - started)


def _rate(model_cache: str, cluster: dict | None, rounds: int) -> float:
    worker = _worker(model_cache, cluster)
    try:
        _batch_rate(worker, "warm")
        return median([_batch_rate(worker, f"round-{i}") for i in range(rounds)])
    finally:
        worker.close(timeout=60)


def _pixels_back(address: str, sides=(32, 512, 1024), calls: int = 30) -> list[dict]:
    """Per image: `ray.get` of an actor's uint8 array (a view of the object store) and the head's one copy."""
    import ray

    from embedded_worker.cluster.connection import NAMESPACE
    from embedded_worker.cluster.ray_environment import prepare_driver

    prepare_driver(loopback=True)  # the head is on 127.0.0.1: so is this driver (Ray would take eth0's address)
    ray.init(address=address, namespace=NAMESPACE, log_to_driver=False)
    try:
        @ray.remote(num_cpus=1)
        class Pixels:
            def image(self, side: int) -> np.ndarray:
                return np.full((side, side, 3), 7, np.uint8)

        actor = Pixels.remote()
        ray.get(actor.image.remote(8))
        rows = []
        for side in sides:
            get, copy, trip = [], [], []
            for _ in range(calls):
                started = time.perf_counter()
                ref = actor.image.remote(side)
                ray.wait([ref])
                ready = time.perf_counter()
                view = ray.get(ref)
                got = time.perf_counter()
                np.array(view, copy=True)
                done = time.perf_counter()
                get.append(got - ready)
                copy.append(done - got)
                trip.append(done - started)
            rows.append({"how": f"pixels back, {side} px RGB", "ray_get_ms": round(median(get) * 1e3, 3),
                         "head_copy_ms": round(median(copy) * 1e3, 3), "call_round_trip_ms": round(
                             median(trip) * 1e3, 3)})
        return rows
    finally:
        ray.shutdown()


def cluster_rows(model_cache: str, rounds: int) -> tuple[list[dict], list[dict]]:
    """(batch rows, pixels-back rows); empty when Ray is not installed."""
    try:
        import ray  # noqa: F401
    except ImportError:
        return [], []
    from embedded_worker.cluster.local_head import LocalRayHead

    head = LocalRayHead(num_cpus=2)
    address = head.start()
    try:
        local = _rate(model_cache, None, rounds)
        rows = [{"how": "local device (2 torch threads)", "img_s": round(local, 2), "vs_local_pct": 0.0}]
        # one actor with both CPUs (2 torch threads, as locally): the cluster path's overhead;
        # one and two actors of 1 CPU: the scaling, on cores the local device would use alone
        for actors, cpus in ((1, 2), (1, 1), (2, 1)):
            cluster = {"address": address, "actors": actors, "cpus_per_actor": cpus, "local_devices": False}
            rate = _rate(model_cache, cluster, rounds)
            rows.append({"how": f"{actors} Ray actor(s), {cpus} CPU each", "img_s": round(rate, 2),
                         "vs_local_pct": round((rate / local - 1) * 100, 1)})
        return rows, _pixels_back(address)
    finally:
        head.stop()
