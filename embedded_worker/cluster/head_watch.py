"""HeadWatch: thread `ew-ray-head`, which decides that the Ray head is lost, and when it is back.

Design notes
- Ray's own decision ends the process (see `ray_environment`), so this
  one is ours: the head's GCS port (or the Ray client server's) is probed
  over TCP every `cluster.head_check_s`; `MISSES` refusals or timeouts in a
  row and the head is lost (`ClusterConnection.lose`). A TCP probe needs
  nothing from Ray, so it answers the same whatever state Ray's driver is in.
- While lost it tries to connect again at the same pace (`reconnect`),
  which first asks the port to answer as a gRPC server, so a head still
  starting costs a probe, not a `ray.init`.
"""

from __future__ import annotations

import logging
import threading

from .local_head import port_open

log = logging.getLogger("embedded_worker.cluster")
MISSES = 3  # probes in a row without an answer: the head is lost
STOP_WAIT_S = 120.0  # close waits this long for a reconnect under way (ray.init, a private head's start)


class HeadWatch:
    def __init__(self, connection, period_s: float):
        self.connection = connection
        self.period_s = period_s
        self._stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name="ew-ray-head", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self.thread.ident is not None and self.thread is not threading.current_thread():
            self.thread.join(STOP_WAIT_S)

    def _run(self) -> None:
        host, port = self.connection.watched
        probe_timeout = max(0.5, min(self.period_s, 5.0))
        misses = 0
        while not self._stopping.wait(self.period_s):
            try:
                if not self.connection.connected:
                    self.connection.reconnect()
                elif port_open(host, port, probe_timeout):
                    misses = 0
                else:
                    misses += 1
                    if misses >= MISSES:
                        misses = 0
                        self.connection.lose(f"{host}:{port} did not answer {MISSES} probes in a row")
            except Exception:  # the watch must outlive anything it runs into
                log.exception("the Ray head watch ran into an error; it goes on")
