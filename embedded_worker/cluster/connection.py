"""ClusterConnection: this process as a Ray driver, for the remote device workers; opened once, closed at close.

Design notes
- A bad address fails at start with `Unavailable`, in bounded time: a
  host:port is probed over TCP first (a refused or silent port fails in
  seconds), and `ray.init` itself runs on a helper thread awaited with a
  deadline, since it has no connect timeout of its own.
- "local" starts a private head as a subprocess (`LocalRayHead`) and then
  connects to it like any other head: the one way that also works inside
  the .NET host.
- Several workers in one process share one driver connection (Ray allows
  one per process); the last to close shuts it down.
"""

from __future__ import annotations

import logging
import threading
import time

from ..config import ClusterConfig
from ..errors import Unavailable
from .local_head import LocalRayHead, port_open

log = logging.getLogger("embedded_worker.cluster")
NAMESPACE = "embedded_worker"
_lock = threading.Lock()  # guards _users
_users = 0  # open connections in this process


class ClusterConnection:
    def __init__(self, config: ClusterConfig):
        self.config = config
        self.head: LocalRayHead | None = None
        self.address = config.address
        self._open = False

    def open(self) -> "ClusterConnection":
        global _users
        timeout = self.config.connect_timeout_s
        started = time.monotonic()
        if self.address == "local":
            self.head = LocalRayHead()
            self.address = self.head.start(timeout)
        elif self.address != "auto":
            host, _, port = self.address.removeprefix("ray://").rpartition(":")
            if not port_open(host, int(port), min(5.0, timeout)):
                raise Unavailable(f"no Ray cluster answers at {self.config.address} (connection refused or timed out)")
        with _lock:
            try:
                self._init(max(1.0, timeout - (time.monotonic() - started)))
            except BaseException:
                if self.head is not None:
                    self.head.stop()
                raise
            _users += 1
            self._open = True
        log.info("connected to the Ray cluster at %s", self.address)
        return self

    def _init(self, timeout: float) -> None:
        import ray

        if ray.is_initialized():
            return
        failure: list[BaseException] = []
        host = self.address.removeprefix("ray://").rpartition(":")[0]
        # a head on loopback: the driver registers on loopback too, so nothing leaves the machine
        loopback = {"_node_ip_address": "127.0.0.1"} if host in ("127.0.0.1", "localhost") else {}

        def connect() -> None:
            try:
                ray.init(address=self.address, namespace=NAMESPACE, log_to_driver=False, **loopback)
            except BaseException as error:  # handed to the waiting thread
                failure.append(error)

        thread = threading.Thread(target=connect, name="ew-ray-connect", daemon=True)
        thread.start()
        thread.join(timeout)
        if thread.is_alive():
            raise Unavailable(f"the Ray cluster at {self.config.address} did not accept this driver within "
                              f"{timeout:.0f} s")
        if failure:
            raise Unavailable(f"cannot connect to the Ray cluster at {self.config.address}: "
                              f"{type(failure[0]).__name__}: {failure[0]}") from failure[0]

    def close(self) -> None:
        global _users
        with _lock:
            if not self._open:
                return
            self._open = False
            _users -= 1
            if _users == 0:
                import ray

                ray.shutdown()
        if self.head is not None:
            self.head.stop()
            self.head = None


def join_cluster(pool) -> None:
    """Connect (or start 'local') and give the DevicePool its remote device workers; Unavailable if the
    cluster cannot be reached."""
    connection = ClusterConnection(pool.config.cluster).open()
    _warn_if_unplaceable(pool.config.cluster)
    try:
        make = remote_worker_factory(pool.config, connection, pool.queue, pool.events, pool.mark_on_device)
        pool.attach_remote([make(index) for index in range(connection.config.actors)], connection, grow=make)
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


def remote_worker_factory(config, connection: ClusterConnection, queue, events, mark_on_device):
    """index -> a RemoteDeviceWorker (`ew-ray-<index>`) with its actor asked for (not yet ready)."""
    import ray

    from ..diffusion.admission import Admission
    from ..diffusion.memory import BatchSizer, MemoryMonitor
    from .actor import DenoiseActor
    from .remote_worker import RemoteDeviceWorker, ReportedProbe

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
        return RemoteDeviceWorker(f"ew-ray-{index}", index, spawn, queue, admission, monitor, events,
                                  mark_on_device, window)

    return make
