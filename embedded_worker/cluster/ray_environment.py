"""What this process, and the private head it starts, tell Ray through the environment before Ray reads it.

Design notes
- A lost head must never end the host. Ray's core worker ends its process
  when the GCS has not answered for `gcs_rpc_server_reconnect_timeout_s`
  (60 s: "Failed to connect to GCS within 60 seconds ... The program will
  terminate", exit 1, no atexit). Ray reads `RAY_<name>` when `ray.init`
  starts the core worker (seen here: set after `import ray`, it still
  applied), so the driver sets it out of reach before each `ray.init`, over
  whatever the host set: the `HeadWatch` decides when the head is lost.
- Loopback stays loopback. `ray.init(address="127.0.0.1:PORT")` rewrites a
  loopback host to the machine's network address (`resolve_ip_for_localhost`
  -> `get_node_ip_address`), and so does `_node_ip_address="127.0.0.1"`.
  `get_node_ip_address` answers 127.0.0.1 only when Ray's multi-node switch
  `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER` is off; Ray reads it once, into
  `ray._private.ray_constants.ENABLE_RAY_CLUSTER`, when that module is
  imported. A head on loopback then gets it in its environment (its raylet
  starts the actors with it), and the driver in `os.environ` and, when Ray
  was imported before, in that constant.
"""

from __future__ import annotations

import os
import sys

RECONNECT_TIMEOUT_VARIABLE = "RAY_gcs_rpc_server_reconnect_timeout_s"
NEVER_S = 10**9  # about 31 years; fits a 32-bit integer
MULTI_NODE_SWITCH = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def is_loopback(host: str) -> bool:
    return host in LOOPBACK_HOSTS


def prepare_driver(loopback: bool) -> None:
    """Before `ray.init` in this process: Ray never ends it for a lost head; a loopback head is reached over
    loopback."""
    os.environ[RECONNECT_TIMEOUT_VARIABLE] = str(NEVER_S)
    if loopback:
        os.environ[MULTI_NODE_SWITCH] = "0"
        constants = sys.modules.get("ray._private.ray_constants")
        if constants is not None:  # imported before: the switch was already read
            constants.ENABLE_RAY_CLUSTER = False


def loopback_head_environment() -> dict[str, str]:
    """The environment of a head bound to 127.0.0.1: its processes, and the actors it starts, stay on loopback."""
    return {**os.environ, MULTI_NODE_SWITCH: "0"}
