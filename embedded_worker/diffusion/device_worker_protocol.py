"""DeviceWorkerProtocol: what the pool, the domain answers and the status calls may ask of a device worker.

A local `DeviceWorker` (a thread driving a torch device) and a
`cluster.RemoteDeviceWorker` (a thread driving a Ray actor) both take their
images from the same WorkQueue through the same Admission; everything else
the engine does with either goes through this, so neither pretends to be
the other (a remote worker has no pipeline on the head, and is never asked
for one).
"""

from __future__ import annotations

import threading
from collections import Counter
from concurrent.futures import Future
from typing import Callable, Protocol, runtime_checkable


@runtime_checkable
class DeviceWorkerProtocol(Protocol):
    name: str
    thread: threading.Thread
    resizes: Counter  # batch (sizing group) -> how often its forwards changed size while its images were in flight
    seconds_per_step: float | None
    loading: str | None  # the model being loaded now
    load_errors: dict[str, str]  # model id -> why its last load failed

    @property
    def active_images(self) -> int: ...

    @property
    def capacity(self) -> int: ...

    def status(self) -> dict: ...

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def call(self, fn: Callable) -> Future:
        """Run `fn(worker)` on the worker's own thread, between two of its steps."""

    def load(self, model_id: str) -> None:
        """On the worker's thread: hold `model_id` ready to run (WorkerError when it cannot)."""

    def unload(self, model_id: str) -> bool: ...
