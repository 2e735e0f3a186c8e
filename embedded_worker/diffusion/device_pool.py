"""DevicePool: the device side as one service for the engine.

It owns the WorkQueue and one DeviceWorker per device (more per device when
configured), and is the only way the engine moves an image: submit, pause,
resume, cancel. Each of those is decided under the queue's lock, so a
request never races a worker taking the same image.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future

import torch

from ..config import WorkerConfig
from ..errors import Cancelled, Unavailable
from .device_worker import DeviceWorker, ResizeHook
from .devices import resolve_devices, resolve_dtype
from .memory import BatchSizer, MemoryMonitor, MemoryProbe, probe_for
from .models import ModelCatalog
from .task import ACTIVE, DONE, NEW, PARKED, QUEUED, DenoiseTask
from .work_queue import WorkQueue

ProbeFactory = Callable[[torch.device], MemoryProbe]


class DevicePool:
    def __init__(
        self,
        config: WorkerConfig,
        catalog: ModelCatalog,
        on_resize: ResizeHook,
        probe_factory: ProbeFactory = probe_for,
    ):
        scheduling = config.scheduling
        self.catalog = catalog
        self.queue = WorkQueue(scheduling.aging_per_second)
        self.monitors: dict[str, MemoryMonitor] = {}
        self.workers: list[DeviceWorker] = []
        for device in resolve_devices(config.device):
            monitor = MemoryMonitor(probe_factory(device))
            sizer = BatchSizer(monitor, scheduling.max_batch_size)
            self.monitors[str(device)] = monitor
            for index in range(scheduling.workers_per_device):
                self.workers.append(
                    DeviceWorker(
                        name=f"ew-device-{device.type}{device.index or 0}-{index}",
                        device=device,
                        dtype=resolve_dtype(config.dtype, device),
                        queue=self.queue,
                        catalog=catalog,
                        monitor=monitor,
                        sizer=sizer,
                        coalesce_wait_s=scheduling.coalesce_wait_ms / 1000.0,
                        max_loaded_models=config.max_loaded_models,
                        gc_freeze=config.gc_freeze,
                        on_resize=on_resize,
                    )
                )
        self._closed = False  # guarded by queue.cond

    def start(self) -> None:
        for worker in self.workers:
            worker.start()

    def submit(self, task: DenoiseTask) -> None:
        with self.queue.cond:
            if self._closed:
                raise Unavailable("the worker is closing")
            self.queue.put(task)

    def pause(self, task: DenoiseTask) -> None:
        """Queued: parked at once. Running: at the next step boundary."""
        with self.queue.cond:
            if task.state == QUEUED:
                self.queue.withdraw(task, PARKED)
            elif task.state == ACTIVE:
                task.pause_requested = True
                return
            else:
                return
        if task.listener is not None:
            task.listener.task_parked(task)

    def resume(self, task: DenoiseTask) -> None:
        with self.queue.cond:
            if task.state == PARKED and not self._closed:
                self.queue.put(task)
            elif task.state == ACTIVE:
                task.pause_requested = False  # resumed before the pause took effect

    def cancel(self, task: DenoiseTask) -> None:
        """Not running: cancelled at once. Running: at the next step boundary."""
        with self.queue.cond:
            if task.state == ACTIVE:
                task.cancel_requested = True
                return
            if task.state == QUEUED:
                self.queue.withdraw(task, DONE)
            elif task.state in (NEW, PARKED):
                task.state = DONE
                task.parked = None
        if not task.future.done():
            task.future.set_exception(Cancelled("cancelled"))

    def on_every_worker(self, fn: Callable) -> list[Future]:
        """Run `fn(worker)` on each worker's own thread, between two of its steps."""
        return [worker.call(fn) for worker in self.workers]

    def pending(self) -> int:
        return self.queue.pending()

    def seconds_per_step(self) -> float | None:
        known = [w.seconds_per_step for w in self.workers if w.seconds_per_step is not None]
        return min(known) if known else None

    def status(self) -> dict:
        return {
            "workers": [worker.status() for worker in self.workers],
            "queued_images": self.queue.pending(),
            "memory": {name: monitor.snapshot() for name, monitor in self.monitors.items()},
        }

    def close(self, timeout: float) -> bool:
        """Stop taking work, fail what waits, stop the workers; True if all joined in time."""
        with self.queue.cond:
            self._closed = True
        for task in self.queue.drain():
            if not task.future.done():
                task.future.set_exception(Unavailable("the worker closed before this image started"))
        for worker in self.workers:
            worker.stop()
        deadline = time.monotonic() + timeout
        for worker in self.workers:
            if worker.thread.ident is not None:
                worker.thread.join(max(0.0, deadline - time.monotonic()))
        return not any(worker.thread.is_alive() for worker in self.workers)
