"""Engine: everything behind the facade, wired once.

The lifecycle loop (the one thread that writes work state), state
(StateBook and its store), catalogs (models, workflows), pixel buffers
(OutputStore), the device side (DevicePool) and the CPU pool for
postprocessing; over them the job service (one lifecycle for sessions and
batch items), the session and batch services (requests in, replies out)
and the progress feed (the board and trackers). The engine builds them in
dependency order, names the book's listeners in the order they hear events,
and adds only what spans them: the aggregated status and an orderly close.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from .diffusion.device_pool import DevicePool
from .diffusion.memory import probe_for
from .diffusion.models import ModelCatalog
from .diffusion.offline import set_offline_environment
from .errors import NotFound
from .lifecycle import batch_view
from .lifecycle.acceptance import Acceptance
from .lifecycle.batches import BatchService
from .lifecycle.checkpoints import Checkpoints
from .lifecycle.child_batch import ChildBatches
from .lifecycle.jobs import JobService
from .lifecycle.loop import LifecycleLoop
from .lifecycle.planning import Planner
from .lifecycle.retention import Retention
from .lifecycle.sessions import SessionService
from .lifecycle.state import FINAL, StateBook, status_counts
from .lifecycle.store import StateStore
from .lifecycle.takeover import restore
from .outputs.store import OutputStore
from .progress.board import ProgressBoard
from .progress.feed import ProgressFeed
from .workflows.catalog import WorkflowCatalog

if TYPE_CHECKING:
    from .config import WorkerConfig
    from .diffusion.device_pool import ProbeFactory
    from .lifecycle.jobs import Job

log = logging.getLogger("embedded_worker")
STOP_GRACE_SECONDS = 300.0  # past close's deadline: how long a step or a model load under way may still take


class Engine:
    def __init__(self, config: WorkerConfig, probe_factory: ProbeFactory = probe_for):
        set_offline_environment()
        self.config = config
        self.started_at = time.time()
        self.store = StateStore(config.resolved_state_path)
        self.checkpoints = Checkpoints(self.store, config.checkpoints.enabled)
        try:
            self._start(config, probe_factory)
        except BaseException:
            cluster = getattr(getattr(self, "pool", None), "cluster", None)
            if cluster is not None:
                cluster.close()  # the driver's actors end with its connection; a private head stops
            self.checkpoints.close()
            self.store.close()  # a worker that never started must not keep the state file locked
            if hasattr(self, "loop"):
                self.loop.stop()
            raise

    def _start(self, config: WorkerConfig, probe_factory: ProbeFactory) -> None:
        self.loop = LifecycleLoop()
        self.book = StateBook(self.loop)
        self.loop.after_each = self.book.emit
        self.loop.start()
        self.board = ProgressBoard(config.board_slots)
        self.models = ModelCatalog(config.models, config.resolved_model_cache_dir)
        self.workflows = WorkflowCatalog(config.workflows_dir, model_known=self._model_known)
        self.outputs = OutputStore(config.limits.max_image_side, config.resolved_output_dir, config.raw_pixels_dir,
                                   self.store if self.store.durable else None)
        self.planner = Planner(config, self.models, self.outputs)
        self.cpu = ThreadPoolExecutor(config.scheduling.cpu_threads, thread_name_prefix="ew-post")
        self.pool = DevicePool(config.device_settings(), self.models, events=self.loop,
                               mark_on_device=self._mark_on_device, probe_factory=probe_factory,
                               checkpoints=self.checkpoints if self.checkpoints.enabled else None)
        if config.cluster.address is not None:  # Ray is imported only here, and only then
            from .cluster.join import join_cluster

            join_cluster(self.pool, config)
        self.jobs = JobService(self.book, self.loop, self.pool, self.cpu, self.outputs, self.store,
                               self.models.native_size, on_progress=self._progressed, checkpoints=self.checkpoints)
        self.acceptance = Acceptance(self.book, self.loop, self.jobs, self.pool, config.limits.max_queued_work,
                             config.limits.max_items, config.scheduling.max_batch_size, self.models.native_size)
        self.sessions = SessionService(self.book, self.loop, self.store, self.jobs, self.acceptance, self.planner,
                                       self.workflows, self.outputs)
        self.batches = BatchService(self.book, self.loop, self.store, self.jobs, self.acceptance, self.planner,
                                    self.workflows, self.outputs, self.pool)
        self.jobs.children = ChildBatches(self.batches, self.jobs, self.cpu, self.loop, self.outputs)
        self.feed = ProgressFeed(self.board, self.book, self.jobs, self.batches, self.cpu)
        self.retention = Retention(config.retention, self.book, self.sessions, self.batches, self.cpu,
                                   self.acceptance.closing)
        # who hears a change, in order: on disk first, then the board and trackers, then retention
        # the runs waiting on a step's batch hear its items last, when everything else has
        self.book.listeners = [self.store.record_event, self.checkpoints.record_event, self.feed.record_event,
                               self.retention.record_event, self.jobs.children.record_event]
        self._close_lock = threading.Lock()  # a racing second close waits for the first
        self.pool.start(then=lambda worker: worker.load(config.default_model))  # warm, not awaited
        self.recovery_report = self.loop.call(restore, self.store, self.outputs, self.book, self.jobs,
                                              self.sessions, self.batches, config.recovery, self.checkpoints)
        self.retention.start()

    def _model_known(self, model_id: str) -> bool:
        try:
            self.models.entry(model_id)
            return True
        except NotFound:
            return False

    def _mark_on_device(self, tasks, left) -> None:
        self.jobs.mark_on_device(tasks, left)

    def _progressed(self, job: Job) -> None:
        self.feed.progress(job)

    # ---- status and close ----------------------------------------------------------------

    def status(self) -> dict:
        pool = self.pool.status()
        batches = list(self.book.batches.values())
        batch_statuses = [batch_view.status(self.batches.items(b)) for b in batches]
        return {
            "device": {"devices": pool["workers"], "memory": pool["memory"]} | (
                {"cluster": pool["cluster"]} if "cluster" in pool else {}),
            "model": {"models": self.models.ids(), "default_model": self.config.default_model},
            "inference": {"queued_images": pool["queued_images"],
                          "active_images": sum(w["active_images"] for w in pool["workers"])},
            "postprocessing": {"threads": self.config.scheduling.cpu_threads},
            "processing": {"sessions": status_counts(self.book.session_statuses()),
                           "batches": status_counts(batch_statuses),
                           "outputs": self.outputs.count(),
                           "workflows": len(self.workflows.describe_all()),
                           "workflow_problems": self.workflows.problems()},
            "recovery": self.recovery_report,
            "state": {"path": self.store.path, "durable": self.store.durable,
                      "quarantined_rows": self.store.quarantined(), "journal_loss": self.store.journal_loss,
                      "unsaved_changes": self.store.unsaved_changes(), "checkpoints": self.checkpoints.status()},
            "uptime_seconds": round(time.time() - self.started_at, 3),
            "closing": self.acceptance.closing.is_set(),
        }

    def close(self, timeout: float, pending: str) -> bool:
        """Refuse new work, then per `pending`: "suspend" keeps unfinished work stored for the next start,
        "cancel" cancels it, "finish" lets it finish within `timeout` and suspends the rest. The device
        threads stop at their next step boundary and are joined, past `timeout` if a step is still under
        way (up to STOP_GRACE_SECONDS); True when every thread has ended. Callers waiting for work get
        their answer. The store closes only once nothing can write to it any more."""
        with self._close_lock:
            if self.acceptance.closing.is_set():
                return self.threads_stopped()
            self.acceptance.closing.set()
            deadline = time.monotonic() + timeout
            if pending == "finish":
                self.loop.wait_for(self._all_final, timeout)
            suspend = pending != "cancel"
            if suspend:  # what is still unfinished stays as stored, to resume at the next start
                self.loop.call(self.book.freeze)
            else:
                self.loop.call(self.jobs.cancel_all, "the worker closed")
            stopped = self.pool.close(max(0.0, deadline - time.monotonic()), STOP_GRACE_SECONDS, suspend)
            if suspend and self.checkpoints.enabled:
                self._checkpoint_paused()
            self.cpu.shutdown(wait=True, cancel_futures=True)
            self.loop.stop()  # what the devices and the CPU pool told last is applied first
            self.checkpoints.close()  # every state handed over is written before the store closes
            if stopped:
                self.store.forget_starts()
                self.store.close()
            else:
                log.error("device threads did not stop within %.0f s of the deadline; the state file stays open",
                          STOP_GRACE_SECONDS)
            return stopped

    def _checkpoint_paused(self) -> None:
        """A suspending close: paused images leave their state, to continue at their step after a restart."""
        paused = self.loop.call(self.jobs.parked_images)
        if paused:
            from .diffusion.checkpoint_cadence import hand_over_waiting

            hand_over_waiting(paused, self.checkpoints)

    def threads_stopped(self) -> bool:
        return not any(worker.thread.is_alive() for worker in self.pool.workers)

    def _all_final(self) -> bool:
        return all(r.status in FINAL for r in [*self.book.sessions.values(), *self.book.items.values()])
