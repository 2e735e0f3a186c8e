"""DevicePool: the device side as one service for the engine.

It owns the WorkQueue and one DeviceWorker per device (more per device when
configured); the workers tell each image's listener what happened to it on
the lifecycle loop (`events`), and the pool is the only way the engine moves an
image: submit, pause, resume, cancel. Each of those is decided under the
queue's lock, so a request never races a worker taking the same image.

With a Ray cluster attached, a lost head (`cluster_lost`) leaves the local
workers taking everything; without local devices, cluster work is refused
as unavailable until the head is back (the connection's `refusal`).

The local workers are made on a thread of their own (`start`): they need
torch and diffusers, seconds of imports that a host's start should not wait
for. Meanwhile work queues as usual and status says the devices are
starting; what needs the workers themselves (`workers`, a model load)
waits for them.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor, Future
from typing import TYPE_CHECKING

from ..errors import Cancelled, Unavailable
from .admission import Admission
from .memory import BatchSizer, MemoryMonitor, MemoryProbe, probe_for
from .task import ACTIVE, CANCEL, DONE, NEW, PARKED, PAUSE, QUEUED
from .work_queue import WorkQueue

if TYPE_CHECKING:
    import torch

    from ..config import DeviceSettings
    from .checkpoint_cadence import CheckpointSink
    from .device_worker import DeviceWorker, OnDeviceMark
    from .device_worker_protocol import DeviceWorkerProtocol
    from .models import ModelCatalog
    from .task import DenoiseTask

log = logging.getLogger("embedded_worker.devices")
ProbeFactory = Callable[["torch.device"], MemoryProbe]
MAX_WORKERS_PER_DEVICE = 8
RESOLVED_LATER = ("auto", "cpu")  # device settings that cannot fail, so the start thread resolves them


class DevicePool:
    def __init__(
        self,
        settings: DeviceSettings,
        catalog: ModelCatalog,
        events: Executor,
        mark_on_device: OnDeviceMark,
        probe_factory: ProbeFactory = probe_for,
        checkpoints: CheckpointSink | None = None,
    ):
        scheduling = settings.scheduling
        self.catalog = catalog
        self.queue = WorkQueue(scheduling.aging_per_second, scheduling.policy)
        self.settings = settings
        self.mark_on_device = mark_on_device
        self.events = events  # the lifecycle loop: the workers post what happened to each image there
        self.checkpoints = checkpoints  # where images' states are written (None: not checkpointed)
        # the start thread publishes the local workers' parts as new dicts and a new list, so a reader on
        # another thread never iterates one that changes size under it
        self._monitors: dict[str, MemoryMonitor] = {}
        self._sizers: dict[str, BatchSizer] = {}
        self._workers: list[DeviceWorkerProtocol] = []  # DeviceWorkers, and RemoteDeviceWorkers with a cluster
        self.cluster = None  # the Ray connection, when remote workers are attached (`attach_remote`)
        self._grow_remote: Callable | None = None  # index -> a new remote worker
        self._remote = 0  # remote workers attached
        self._probe_factory = probe_factory
        self._devices: list | None = None  # resolved by the start thread, unless the setting names a device
        if not settings.local_devices:
            self._devices = []  # only the cluster's actors take work
        elif settings.device not in RESOLVED_LATER:
            from .devices import resolve_devices

            self._devices = resolve_devices(settings.device)  # a named device that is not there fails now
        self._starter: threading.Thread | None = None
        self._started = threading.Event()  # the local workers are made and started, or could not be
        self._start_error: Unavailable | None = None
        self._closed = False  # guarded by queue.cond

    # The device side's parts, once the start thread has made them (these wait for it); the pool's own
    # status reads what there is without waiting.
    @property
    def workers(self) -> list:
        """Every device worker, local ones first."""
        self._started.wait()
        return self._workers

    @property
    def monitors(self) -> dict[str, MemoryMonitor]:
        """Device name -> its memory monitor."""
        self._started.wait()
        return self._monitors

    @property
    def sizers(self) -> dict[str, BatchSizer]:
        """Local device name -> its batch sizer."""
        self._started.wait()
        return self._sizers

    @property
    def starting(self) -> bool:
        return not self._started.is_set()

    def wait_started(self) -> None:
        """Wait until the local workers run; Unavailable if they could not be made."""
        self._started.wait()
        if self._start_error is not None:
            raise self._start_error

    def attach_remote(self, workers: list, connection, grow: Callable | None = None) -> None:
        """Remote device workers (`cluster.RemoteDeviceWorker`) beside the local ones, before `start`; the
        connection closes with the pool; `grow(index)` makes one more (`ensure_parallel`)."""
        self.cluster, self._grow_remote = connection, grow
        for worker in workers:
            self._attach(worker)

    def _attach(self, worker) -> None:
        self._monitors[str(worker.device)] = worker.monitor
        self._workers.append(worker)
        self._remote += 1

    def _make_worker(self, device: "torch.device", index: int) -> "DeviceWorker":
        from .checkpoint_cadence import CheckpointCadence
        from .device_worker import DeviceWorker
        from .devices import resolve_dtype

        scheduling = self.settings.scheduling
        checkpoints = self.checkpoints
        return DeviceWorker(
            name=f"ew-device-{device.type}{device.index or 0}-{index}",
            device=device,
            dtype=resolve_dtype(self.settings.dtype, device),
            queue=self.queue,
            catalog=self.catalog,
            monitor=self._monitors[str(device)],
            admission=Admission(self.queue, self._sizers[str(device)], scheduling.coalesce_wait_ms / 1000.0,
                                scheduling.preempt, scheduling.max_preemptions_per_image),
            events=self.events,
            mark_on_device=self.mark_on_device,
            max_loaded_models=self.settings.max_loaded_models,
            gc_freeze=self.settings.gc_freeze,
            checkpoints=None if checkpoints is None else CheckpointCadence(checkpoints, self.settings.checkpoints),
            compile_cache_dir=self.settings.compile_cache_dir,
            compile_lanes=self.settings.compile_lanes,
        )

    def start(self, then: Callable | None = None) -> None:
        """Start the remote workers attached so far, and make and start the local ones on a thread of their
        own; then run `then(worker)` on every worker's thread (a warm-up), not awaited."""
        for worker in self._workers:
            worker.start()
        self._starter = threading.Thread(target=self._start_local, args=(then,), name="ew-device-start",
                                         daemon=True)
        self._starter.start()

    def _start_local(self, then: Callable | None) -> None:
        try:
            from . import offline

            offline.quiet_libraries()  # diffusers and transformers, torch with them: what the start left out
            from .devices import resolve_devices

            devices = resolve_devices(self.settings.device) if self._devices is None else self._devices
            scheduling = self.settings.scheduling
            if scheduling.torch_threads is not None and any(device.type == "cpu" for device in devices):
                import torch

                torch.set_num_threads(scheduling.torch_threads)  # before any worker's first operation
            monitors = {str(device): MemoryMonitor(self._probe_factory(device)) for device in devices}
            sizers = {name: BatchSizer(monitor, scheduling.max_batch_size) for name, monitor in monitors.items()}
            self._devices = devices
            self._monitors, self._sizers = {**monitors, **self._monitors}, sizers
            local = [self._make_worker(device, index) for device in devices
                     for index in range(scheduling.workers_per_device)]
            with self.queue.cond:
                if self._closed:
                    return
                self._workers = [*local, *self._workers]
                for worker in local:
                    worker.start()
        except BaseException as error:
            log.exception("the device workers could not be made")
            self._start_error = Unavailable(f"the devices could not start: {type(error).__name__}: {error}")
        finally:
            self._started.set()  # before any owner hears of its image: what it reads then must not wait
        if self._start_error is not None:
            with self.queue.cond:
                left = self.queue.drain()
            for task in left:
                if not task.future.done():
                    task.future.set_exception(self._start_error)
        elif then is not None:
            self.on_every_worker(then)

    def ensure_parallel(self, workers: int, model_id: str) -> dict:
        """At least `workers` device workers per device (each its own pipeline copy), where memory allows,
        and at least `workers` Ray actors when a cluster is attached.

        A further copy is added only while the device has room for the model
        (its safetensors bytes, at the worker's dtype) half as much again.
        """
        from .devices import resolve_dtype

        added, refused = [], []
        model_bytes = self.catalog.weight_bytes(model_id)
        self.wait_started()
        with self.queue.cond:
            if self._closed:
                return {"added": added, "refused": refused}
            for device in self._devices:
                while (index := sum(1 for w in self._workers if w.device == device)) < min(
                        workers, MAX_WORKERS_PER_DEVICE):
                    need = model_bytes * resolve_dtype(self.settings.dtype, device).itemsize / 4 * 1.5
                    free = self._monitors[str(device)].probe.read().free
                    if free < need:
                        refused.append({"device": str(device), "free_bytes": int(free), "needed_bytes": int(need)})
                        break
                    worker = self._make_worker(device, index)
                    self._workers.append(worker)
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
            failed = self._start_error
            if failed is None:
                if task.state == NEW:  # not cancelled between its creation and now
                    self.queue.put(task)
                return
            task.state = DONE
        if not task.future.done():
            task.future.set_exception(failed)  # as the images that waited when the start failed: with why

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
                if task.resume_from is not None:
                    task.resume_from.release()
                    task.resume_from = None
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
        """Run `fn(worker)` on each worker's own thread, between two of its steps (once they run)."""
        self.wait_started()
        return [worker.call(fn) for worker in self._workers]

    def resizes(self, group: str) -> int:
        """How often the forwards a batch's images were in changed size (memory, out-of-memory)."""
        return sum(worker.resizes[group] for worker in self._workers)

    def forget(self, group: str) -> None:
        for worker in self._workers:
            worker.resizes.pop(group, None)

    def pending(self) -> int:
        return self.queue.pending()

    def seconds_per_step(self) -> float | None:
        known = [w.seconds_per_step for w in self._workers if w.seconds_per_step is not None]
        return min(known) if known else None

    def status(self) -> dict:
        status = {
            "workers": [worker.status() for worker in self._workers],
            "queued_images": self.queue.pending(),
            "memory": {name: monitor.snapshot() for name, monitor in self._monitors.items()},
        }
        if self.starting:
            status["starting"] = True  # the local workers are being made: work queues until they run
        if self._start_error is not None:
            status["start_error"] = str(self._start_error)
        if self.cluster is not None:
            status["cluster"] = self.cluster.status()
        return status

    def close(self, timeout: float, grace: float, suspend: bool = False) -> bool:
        """Stop taking work, fail what waits, stop the workers at their next step boundary and join them:
        within `timeout`, then up to `grace` more for a step (or a model load) still under way.
        `suspend`: the images in flight and the preempted ones waiting leave their state as checkpoints, to
        continue where they stopped at the next start. True when every worker thread has ended."""
        with self.queue.cond:
            self._closed = True  # the start thread makes no worker from here on
        left = self.queue.drain()
        if suspend and left and self.checkpoints is not None:
            from .checkpoint_cadence import hand_over_waiting

            hand_over_waiting(left, self.checkpoints)
        for task in left:
            if not task.future.done():
                task.future.set_exception(Unavailable("the worker closed before this image started"))
        for worker in self._workers:
            worker.suspending = suspend
            worker.stop()
        threads = [worker.thread for worker in self._workers]
        if self._starter is not None:
            threads.append(self._starter)  # it may still be importing
        for limit in (timeout, grace):
            deadline = time.monotonic() + limit
            for thread in threads:
                if thread.ident is not None:
                    thread.join(max(0.0, deadline - time.monotonic()))
            late = [thread.name for thread in threads if thread.is_alive()]
            if not late:
                if self.cluster is not None:
                    self.cluster.close()
                return True
            log.warning("%s still finishing a step at the close deadline; waiting for it", ", ".join(late))
        if self.cluster is not None:
            self.cluster.close()  # a private Ray head must not outlive the worker, even a late one
        return False
