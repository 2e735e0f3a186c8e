"""DevicePool: the device side as one service for the engine.

It owns the WorkQueue and one DeviceWorker per device (more per device when
configured); the workers tell each image's listener what happened to it on
the lifecycle loop (`events`), and the pool is the only way the engine moves an
image: submit, pause, resume, cancel. Each of those is decided under the
queue's lock, so a request never races a worker taking the same image.

With a Ray cluster attached, a lost head (`cluster_lost`) leaves the local
workers taking everything; without local devices, cluster work is refused
as unavailable until the head is back (the connection's `refusal`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import Executor, Future
from typing import TYPE_CHECKING

import torch

from ..errors import Cancelled, Unavailable
from .admission import Admission
from .device_worker import DeviceWorker
from .devices import resolve_devices, resolve_dtype
from .memory import BatchSizer, MemoryMonitor, MemoryProbe, probe_for
from .task import ACTIVE, CANCEL, DONE, NEW, PARKED, PAUSE, QUEUED
from .work_queue import WorkQueue

if TYPE_CHECKING:
    from ..config import DeviceSettings
    from .device_worker import OnDeviceMark
    from .device_worker_protocol import DeviceWorkerProtocol
    from .models import ModelCatalog
    from .task import DenoiseTask

log = logging.getLogger("embedded_worker.devices")
ProbeFactory = Callable[[torch.device], MemoryProbe]
MAX_WORKERS_PER_DEVICE = 8


class DevicePool:
    def __init__(
        self,
        settings: DeviceSettings,
        catalog: ModelCatalog,
        events: Executor,
        mark_on_device: OnDeviceMark,
        probe_factory: ProbeFactory = probe_for,
    ):
        scheduling = settings.scheduling
        self.catalog = catalog
        self.queue = WorkQueue(scheduling.aging_per_second, scheduling.policy)
        self.settings = settings
        self.mark_on_device = mark_on_device
        self.events = events  # the lifecycle loop: the workers post what happened to each image there
        self.monitors: dict[str, MemoryMonitor] = {}
        self.sizers: dict[str, BatchSizer] = {}
        self.workers: list[DeviceWorkerProtocol] = []  # DeviceWorkers, and RemoteDeviceWorkers with a cluster
        self.cluster = None  # the Ray connection, when remote workers are attached (`attach_remote`)
        self._grow_remote: Callable | None = None  # index -> a new remote worker
        self._remote = 0  # remote workers attached
        self._devices = resolve_devices(settings.device) if settings.local_devices else []
        for device in self._devices:
            monitor = MemoryMonitor(probe_factory(device))
            self.monitors[str(device)] = monitor
            self.sizers[str(device)] = BatchSizer(monitor, scheduling.max_batch_size)
            for _ in range(scheduling.workers_per_device):
                self._add_worker(device)
        self._closed = False  # guarded by queue.cond

    def attach_remote(self, workers: list, connection, grow: Callable | None = None) -> None:
        """Remote device workers (`cluster.RemoteDeviceWorker`) beside the local ones, before `start`; the
        connection closes with the pool; `grow(index)` makes one more (`ensure_parallel`)."""
        self.cluster, self._grow_remote = connection, grow
        for worker in workers:
            self._attach(worker)

    def _attach(self, worker) -> None:
        self.monitors[str(worker.device)] = worker.monitor
        self.workers.append(worker)
        self._remote += 1

    def _add_worker(self, device: torch.device) -> DeviceWorker:
        scheduling = self.settings.scheduling
        index = sum(1 for w in self.workers if w.device == device)
        worker = DeviceWorker(
            name=f"ew-device-{device.type}{device.index or 0}-{index}",
            device=device,
            dtype=resolve_dtype(self.settings.dtype, device),
            queue=self.queue,
            catalog=self.catalog,
            monitor=self.monitors[str(device)],
            admission=Admission(self.queue, self.sizers[str(device)], scheduling.coalesce_wait_ms / 1000.0,
                                scheduling.preempt, scheduling.max_preemptions_per_image),
            events=self.events,
            mark_on_device=self.mark_on_device,
            max_loaded_models=self.settings.max_loaded_models,
            gc_freeze=self.settings.gc_freeze,
        )
        self.workers.append(worker)
        return worker

    def start(self) -> None:
        for worker in self.workers:
            worker.start()

    def ensure_parallel(self, workers: int, model_id: str) -> dict:
        """At least `workers` device workers per device (each its own pipeline copy), where memory allows,
        and at least `workers` Ray actors when a cluster is attached.

        A further copy is added only while the device has room for the model
        (its safetensors bytes, at the worker's dtype) half as much again.
        """
        added, refused = [], []
        model_bytes = self.catalog.weight_bytes(model_id)
        with self.queue.cond:
            if self._closed:
                return {"added": added, "refused": refused}
            for device in self._devices:
                while sum(1 for w in self.workers if w.device == device) < min(workers, MAX_WORKERS_PER_DEVICE):
                    need = model_bytes * resolve_dtype(self.settings.dtype, device).itemsize / 4 * 1.5
                    free = self.monitors[str(device)].probe.read().free
                    if free < need:
                        refused.append({"device": str(device), "free_bytes": int(free), "needed_bytes": int(need)})
                        break
                    worker = self._add_worker(device)
                    worker.start()
                    added.append(worker.name)
            # with a cluster, a batch's parallelism is also its spread over actors: one more each short
            while (self._grow_remote is not None and self.cluster.connected
                   and self._remote < min(workers, MAX_WORKERS_PER_DEVICE)):
                worker = self._grow_remote(self._remote)
                self._attach(worker)
                worker.start()
                added.append(worker.name)
        return {"added": added, "refused": refused}

    def submit(self, task: DenoiseTask) -> None:
        with self.queue.cond:
            if self._closed:
                raise Unavailable("the worker is closing")
            refused = self.cluster.refusal() if self.cluster is not None else None
            if refused is not None:
                raise refused
            if task.state == NEW:  # not cancelled between its creation and now
                self.queue.put(task)

    def pause(self, task: DenoiseTask) -> None:
        """Queued: parked at once. Running: at the next step boundary."""
        with self.queue.cond:
            if task.state == QUEUED:
                self.queue.withdraw(task, PARKED)
            elif task.state == ACTIVE:
                task.ask_to_leave(PAUSE)
                return
            else:
                return
        if task.listener is not None:
            task.listener.task_parked(task)

    def resume(self, task: DenoiseTask) -> None:
        with self.queue.cond:
            if task.state == PARKED and not self._closed:
                self.queue.put(task)
            elif task.state == ACTIVE and task.leaving == PAUSE:
                task.leaving = None  # resumed before the pause took effect

    def cancel(self, task: DenoiseTask) -> None:
        """Not running: cancelled at once. Running: at the next step boundary."""
        with self.queue.cond:
            if task.state == ACTIVE:
                task.ask_to_leave(CANCEL)
                return
            if task.state == QUEUED:
                self.queue.withdraw(task, DONE)
                task.parked = None  # a preempted image waits with its denoising state
            elif task.state in (NEW, PARKED):
                task.state = DONE
                task.parked = None
        if not task.future.done():
            task.future.set_exception(Cancelled("cancelled"))

    def cluster_lost(self) -> None:
        """The connection's watch found the Ray head lost. Local workers take what waits, and the images the
        remote workers put back; without local devices what waits fails now, as unavailable."""
        with self.queue.cond:
            refused = self.cluster.refusal()
            left = self.queue.take_all() if refused is not None else []
        for task in left:
            if not task.future.done():
                task.future.set_exception(refused)

    def on_every_worker(self, fn: Callable) -> list[Future]:
        """Run `fn(worker)` on each worker's own thread, between two of its steps."""
        return [worker.call(fn) for worker in self.workers]

    def resizes(self, group: str) -> int:
        """How often the forwards a batch's images were in changed size (memory, out-of-memory)."""
        return sum(worker.resizes[group] for worker in self.workers)

    def forget(self, group: str) -> None:
        for worker in self.workers:
            worker.resizes.pop(group, None)

    def pending(self) -> int:
        return self.queue.pending()

    def seconds_per_step(self) -> float | None:
        known = [w.seconds_per_step for w in self.workers if w.seconds_per_step is not None]
        return min(known) if known else None

    def status(self) -> dict:
        status = {
            "workers": [worker.status() for worker in self.workers],
            "queued_images": self.queue.pending(),
            "memory": {name: monitor.snapshot() for name, monitor in self.monitors.items()},
        }
        if self.cluster is not None:
            status["cluster"] = self.cluster.status()
        return status

    def close(self, timeout: float, grace: float) -> bool:
        """Stop taking work, fail what waits, stop the workers at their next step boundary and join them:
        within `timeout`, then up to `grace` more for a step (or a model load) still under way.
        True when every worker thread has ended."""
        with self.queue.cond:
            self._closed = True
        for task in self.queue.drain():
            if not task.future.done():
                task.future.set_exception(Unavailable("the worker closed before this image started"))
        for worker in self.workers:
            worker.stop()
        for limit in (timeout, grace):
            deadline = time.monotonic() + limit
            for worker in self.workers:
                if worker.thread.ident is not None:
                    worker.thread.join(max(0.0, deadline - time.monotonic()))
            late = [worker.name for worker in self.workers if worker.thread.is_alive()]
            if not late:
                if self.cluster is not None:
                    self.cluster.close()
                return True
            log.warning("%s still finishing a step at the close deadline; waiting for it", ", ".join(late))
        if self.cluster is not None:
            self.cluster.close()  # a private Ray head must not outlive the worker, even a late one
        return False
