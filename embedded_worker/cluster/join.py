"""Joining a cluster: the connection, its actors and the remote device workers that drive them.

Kept apart from `connection.py` (which only connects, watches the head and
reconnects) so that the remote workers, which use the connection, are not
imported by it.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from ..diffusion.memory import MemoryReading
from .connection import ClusterConnection

if TYPE_CHECKING:
    from ..config import ClusterConfig

log = logging.getLogger("embedded_worker.cluster")


class ReportedProbe:
    """The actor's memory as it last reported it: a monitor for status, never a sizing input."""

    def __init__(self):
        self.reading = MemoryReading(0, 0)

    def read(self) -> MemoryReading:
        return self.reading

    def reset_peak(self) -> None:
        pass

    def peak_used(self) -> int:
        return self.reading.used


def join_cluster(pool, config) -> None:
    """Connect (or start 'local') and give the DevicePool its remote device workers; Unavailable if the
    cluster cannot be reached. `config`: the worker's, which its actors get (without its state and files)."""
    connection = ClusterConnection(config.cluster, pool.queue.cond).open()
    _warn_if_unplaceable(config.cluster)
    try:
        make = remote_worker_factory(config, connection, pool.queue, pool.events, pool.mark_on_device,
                                     pool.checkpoints)
        pool.attach_remote([make(index) for index in range(connection.config.actors)], connection, grow=make)
        connection.watch(pool.cluster_lost)
    except BaseException:
        connection.close()
        raise


def _warn_if_unplaceable(cluster: ClusterConfig) -> None:
    """An actor the cluster cannot place waits (an autoscaler may add the node): say so at start."""
    import ray

    resources = ray.cluster_resources()
    for name, each in (("GPU", cluster.gpus_per_actor), ("CPU", cluster.cpus_per_actor)):
        if each * cluster.actors > resources.get(name, 0):
            log.warning("the cluster has %s %s for %d actors asking %s each: some wait until nodes join",
                        resources.get(name, 0), name, cluster.actors, each)


def remote_worker_factory(config, connection: ClusterConnection, queue, events, mark_on_device, checkpoints):
    """index -> a RemoteDeviceWorker (`ew-ray-<index>`) with its actor asked for (not yet ready)."""
    import ray

    from ..diffusion.admission import Admission
    from ..diffusion.memory import BatchSizer, MemoryMonitor
    from .actor import DenoiseActor
    from .remote_worker import RemoteDeviceWorker

    cluster = connection.config
    actor_config = config.model_dump(mode="json") | {
        "cluster": {}, "state_path": ":memory:", "output_dir": None, "workflows_dir": None, "allowed_roots": [],
        "device": "auto" if cluster.gpus_per_actor > 0 else "cpu",
        "scheduling": config.scheduling.model_dump(mode="json") | {"workers_per_device": 1}}
    actor_class = ray.remote(DenoiseActor)
    window = cluster.in_flight_per_actor

    def spawn(name: str):
        return actor_class.options(name=name, num_cpus=cluster.cpus_per_actor, num_gpus=cluster.gpus_per_actor,
                                   max_concurrency=window + 8, max_restarts=0).remote(actor_config, name)

    def make(index: int) -> RemoteDeviceWorker:
        monitor = MemoryMonitor(ReportedProbe())
        admission = Admission(queue, BatchSizer(monitor, window), config.scheduling.coalesce_wait_ms / 1000.0,
                              preempt=False, max_preemptions=config.scheduling.max_preemptions_per_image)
        return RemoteDeviceWorker(f"ew-ray-{index}", index, spawn, connection, queue, admission, monitor, events,
                                  mark_on_device, window, checkpoints)

    return make
