"""ClusterConnection: this process as a Ray driver, for the remote device workers; opened once, closed at close.

Design notes
- A bad address fails at start with `Unavailable`, in bounded time: a
  host:port must answer as a gRPC server (a refused, silent or non-HTTP/2
  port fails in seconds and no connect thread is left behind), and
  `ray.init` itself runs on a helper thread awaited with a deadline, since
  it has no connect timeout of its own.
- "local" starts a private head as a subprocess (`LocalRayHead`) and then
  connects to it like any other head: the one way that also works inside
  the .NET host.
- Several workers in one process share one driver connection (Ray allows
  one per process); the last to close shuts it down.
- A lost head never ends the host (issue 23): Ray is told never to give up
  on its GCS (`ray_environment`), and the `HeadWatch` decides instead. On a
  loss the state turns `lost` under the queue's lock (the remote workers
  read it there), the pool hears of it, the watch waits for the remote
  workers to leave their Ray calls and shuts the driver down; it connects
  again when the head answers (a private head it starts again).
"""

from __future__ import annotations

import logging
import threading
import time
from contextlib import contextmanager
from typing import TYPE_CHECKING, Callable

from ..errors import Unavailable
from .local_head import LocalRayHead, speaks_grpc
from .ray_environment import is_loopback, prepare_driver

if TYPE_CHECKING:
    from ..config import ClusterConfig

log = logging.getLogger("embedded_worker.cluster")
NAMESPACE = "embedded_worker"
CONNECTED, LOST = "connected", "lost"
RELEASE_WAIT_S = 30.0  # a lost head's driver shuts down once the remote workers left Ray, or after this
_lock = threading.Lock()  # guards _users and _driver: one ray.init / ray.shutdown at a time in this process
_users = 0  # open connections in this process
_driver = 0  # which ray.init this process's driver is (a connection shuts down only the one it lost)


class HeadLost(Unavailable):
    """The Ray head does not answer: cluster work waits for it, or is refused without local devices."""


class ClusterConnection:
    def __init__(self, config: ClusterConfig, cond: threading.Condition | None = None):
        self.config = config
        self.head: LocalRayHead | None = None
        self.address = config.address
        self.watched: tuple[str, int] | None = None  # the head's GCS (or Ray client server), probed by the watch
        self.cond = cond or threading.Condition()  # the pool's queue lock: guards the fields below
        self.state = LOST  # until open
        self.losses = 0
        self.reconnects = 0
        self.lost_since: float | None = None
        self._inside = 0  # threads inside Ray calls (`using_ray`)
        self._driver = 0  # the ray.init this connection uses
        self._open = False
        self._watch = None  # HeadWatch, from `watch`
        self._on_lost: Callable[[], None] = lambda: None

    def open(self) -> "ClusterConnection":
        global _users
        timeout = self.config.connect_timeout_s
        started = time.monotonic()
        if self.address == "local":
            self.head = LocalRayHead()
            self.address = self.head.start(timeout)
        elif self.address != "auto":
            host, _, port = self.address.removeprefix("ray://").rpartition(":")
            if not speaks_grpc(host, int(port), min(5.0, timeout)):
                raise Unavailable(f"no Ray cluster answers at {self.config.address} (connection refused or timed "
                                  f"out, or the port is not a Ray head's)")
        with _lock:
            try:
                self._init(max(1.0, timeout - (time.monotonic() - started)))
            except BaseException:
                if self.head is not None:
                    self.head.stop()
                raise
            _users += 1
            self._open = True
        self.watched = self._head_address()
        with self.cond:
            self.state = CONNECTED
        log.info("connected to the Ray cluster at %s", self.address)
        return self

    def _init(self, timeout: float) -> None:
        """With `_lock` held."""
        global _driver
        import ray

        if ray.is_initialized():
            self._driver = _driver
            return
        failure: list[BaseException] = []
        prepare_driver(loopback=is_loopback(self._host()))

        def connect() -> None:
            try:
                ray.init(address=self.address, namespace=NAMESPACE, log_to_driver=False)
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
        _driver += 1
        self._driver = _driver

    def _host(self) -> str:
        return self.address.removeprefix("ray://").rpartition(":")[0]

    def _head_address(self) -> tuple[str, int]:
        if self.address == "auto":
            import ray

            host, _, port = ray.get_runtime_context().gcs_address.rpartition(":")
        else:
            host, _, port = self.address.removeprefix("ray://").rpartition(":")
        return host, int(port)

    # ---- the remote workers ----------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self.state == CONNECTED

    @contextmanager
    def using_ray(self):
        """Around every Ray call of a remote worker: HeadLost once the head is lost, and the driver is not
        shut down under a call still inside."""
        with self.cond:
            if self.state != CONNECTED:
                raise self._lost_error()
            self._inside += 1
        try:
            yield
        finally:
            with self.cond:
                self._inside -= 1
                self.cond.notify_all()

    def refusal(self) -> HeadLost | None:
        """With the queue's lock held: why cluster work is refused now (the head is lost and this worker has
        no local devices), or None."""
        if self.state == CONNECTED or self.config.local_devices:
            return None
        return HeadLost(f"{self._lost_error()}; this worker has no local devices (cluster.local_devices is off), "
                        f"so work that needs the cluster is refused until the head is back")

    def _lost_error(self) -> HeadLost:
        since = time.strftime("%H:%M:%S", time.localtime(self.lost_since)) if self.lost_since else "start"
        return HeadLost(f"the Ray head at {self.address} is lost (since {since})")

    def status(self) -> dict:
        with self.cond:
            return {"address": self.config.address, "state": self.state, "head_losses": self.losses,
                    "reconnects": self.reconnects, "lost_since": self.lost_since}

    # ---- the head watch ------------------------------------------------------------------

    def watch(self, on_lost: Callable[[], None]) -> None:
        """Start the HeadWatch; `on_lost()` is called (no lock held) each time the head is found lost."""
        from .head_watch import HeadWatch

        self._on_lost = on_lost
        self._watch = HeadWatch(self, self.config.head_check_s)
        self._watch.start()

    def lose(self, why: str) -> None:
        """The watch found the head gone: refuse Ray calls from now on, tell the pool, and shut the driver down
        once no remote worker is inside a Ray call (Ray must not keep retrying its GCS for ever)."""
        with self.cond:
            if self.state != CONNECTED:
                return
            self.state, self.lost_since = LOST, time.time()
            self.losses += 1
            self.cond.notify_all()
        log.error("the Ray head at %s is lost (%s); its actors' images go %s", self.address, why,
                  "to this machine's devices" if self.config.local_devices else "back as unavailable")
        self._on_lost()
        with self.cond:
            if not self.cond.wait_for(lambda: self._inside == 0, RELEASE_WAIT_S):
                log.warning("remote workers still inside Ray calls %.0f s after the head was lost", RELEASE_WAIT_S)
        self._disconnect()

    def _disconnect(self) -> None:
        import ray

        with _lock:
            if ray.is_initialized() and self._driver == _driver:
                ray.shutdown()

    def reconnect(self) -> bool:
        """One try, from the watch: True when connected again (a private head is first started again)."""
        timeout = self.config.connect_timeout_s
        try:
            if self.head is not None and (self.head.process is None or self.head.process.poll() is not None):
                old, self.head = self.head, None
                old.stop()
                self.head = LocalRayHead(old.num_cpus, old.port)
                self.head.start(timeout)
            host, port = self.watched
            if not speaks_grpc(host, port, min(5.0, timeout)):
                return False
            with _lock:
                self._init(timeout)
        except Exception as error:
            log.warning("the Ray head at %s is not back yet: %s", self.address, error)
            self._disconnect()  # a half-made driver must not retry behind the watch's back
            return False
        with self.cond:
            self.state, self.lost_since = CONNECTED, None
            self.reconnects += 1
            self.cond.notify_all()
        log.info("connected to the Ray cluster at %s again", self.address)
        return True

    def close(self) -> None:
        global _users
        if self._watch is not None:
            self._watch.stop()
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
