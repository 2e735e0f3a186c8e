"""LocalRayHead: a private Ray head on this machine, started as a subprocess and stopped with its process group.

Design notes
- Started with the venv's own `ray` script, found beside the installed ray
  package, not from `sys.executable`: inside the .NET host that is the base
  interpreter, and workers spawned from it would lose the venv's packages.
  `ray start` then runs every worker with that same venv interpreter.
- `ray.init()` starting a local cluster from inside the Mono host timed out
  (field notes); a head started as a plain subprocess and then connected to
  works there, so "local" is that, in the host and outside it alike.
- Bound to 127.0.0.1 with Ray's multi-node switch off, so every process
  it starts listens and connects on loopback only (`ray_environment`);
  its own temp dir (short: Ray's socket paths must fit
  in 107 bytes), `--block` in its own session. Stopped by SIGTERM to the
  `ray start` process, then to its process group, SIGKILL after a deadline;
  never `ray stop`, which stops every Ray on the machine.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ..errors import Unavailable
from .ray_environment import loopback_head_environment

HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])  # + an empty SETTINGS
SETTINGS_FRAME = 4


def ray_script() -> str:
    """The `ray` command of the environment the ray package is installed in."""
    import ray  # the package's location names its environment, wherever this interpreter came from

    package = Path(ray.__file__).resolve().parent
    # venv/lib/python3.X/site-packages/ray (POSIX), venv/Lib/site-packages/ray (Windows)
    for folder in (package.parents[3] / "bin", package.parents[2] / "Scripts", Path(sys.prefix) / "bin"):
        for name in ("ray", "ray.exe"):
            if (folder / name).is_file():
                return str(folder / name)
    found = shutil.which("ray")
    if found is None:
        raise Unavailable("the 'ray' command was not found beside the ray package "
                          "(pip install embedded_worker[cluster])")
    return found


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def port_open(host: str, port: int, timeout: float) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def speaks_grpc(host: str, port: int, timeout: float) -> bool:
    """Whether the port answers as an HTTP/2 (gRPC) server does, with its SETTINGS frame, within `timeout`:
    a Ray head's GCS and a Ray client server do; a port that accepts and stays silent does not, and
    `ray.init` against one retries for minutes on a thread that cannot be stopped (issue 23)."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as connection:
            connection.settimeout(timeout)
            connection.sendall(HTTP2_PREFACE)
            header = connection.recv(9)
    except OSError:
        return False
    return len(header) >= 4 and header[3] == SETTINGS_FRAME


class LocalRayHead:
    def __init__(self, num_cpus: int | None = None, port: int | None = None):
        self.num_cpus = num_cpus
        self.port = port or free_port()
        self.temp_dir = tempfile.mkdtemp(prefix="ewray", dir="/tmp" if os.name != "nt" else None)
        self.process: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> str:
        command = [ray_script(), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={self.port}",
                   "--include-dashboard=false", f"--temp-dir={self.temp_dir}", "--disable-usage-stats", "--block"]
        if self.num_cpus is not None:
            command.append(f"--num-cpus={self.num_cpus}")
        log = open(Path(self.temp_dir) / "head.log", "wb")
        self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                        start_new_session=True, env=loopback_head_environment())
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.stop()
                raise Unavailable(f"the local Ray head exited at start (code {self.process.returncode}); "
                                  f"see {self.temp_dir}/head.log")
            if port_open("127.0.0.1", self.port, 0.5):
                return self.address
            time.sleep(0.2)
        self.stop()
        raise Unavailable(f"the local Ray head did not answer within {timeout:.0f} s")

    def stop(self, timeout: float = 40.0) -> None:
        """SIGTERM to `ray start` alone first: it drains and stops its children while its GCS still answers
        (about 2 s here; a SIGTERM to the whole group killed the GCS first and the drain then waited 30-60 s
        for it). Then SIGTERM, and past `timeout` SIGKILL, to whatever of its process group is left."""
        process, self.process = self.process, None
        if process is None:
            return
        deadline = time.monotonic() + timeout
        try:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
        for sig, until in ((signal.SIGTERM, deadline), (signal.SIGKILL, time.monotonic() + 10.0)):
            if not _group_alive(process.pid):
                break
            try:
                os.killpg(process.pid, sig)
            except ProcessLookupError:
                break
            while _group_alive(process.pid) and time.monotonic() < until:
                time.sleep(0.1)
        if process.poll() is None:
            process.wait(10)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
