"""Engine: everything behind the facade, wired once.

State (StateBook), catalogs (models, workflows), pixel buffers (OutputStore),
the device side (DevicePool) and the CPU pool for postprocessing. Sessions
and batches are services over these; the engine adds what spans them:
capacity checks, time estimates, the aggregated status and an orderly close.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from .batches import BatchService
from .config import WorkerConfig
from .diffusion.device_pool import DevicePool, ProbeFactory
from .diffusion.memory import probe_for
from .diffusion.models import ModelCatalog
from .diffusion.offline import set_offline_environment
from .errors import NotFound, ResourceExhausted, Unavailable
from .outputs import OutputStore
from .planning import Planner, RunPlan
from .progress_board import ProgressBoard
from .protocol import DeleteBatchRequest, DeleteSessionRequest, parse
from .recovery import recover
from .sessions import SessionService
from .state import FINAL, StateBook
from .store import StateStore
from .workflows.catalog import WorkflowCatalog

log = logging.getLogger("embedded_worker")
PRUNE_INTERVAL_SECONDS = 60.0
STOP_GRACE_SECONDS = 300.0  # past close's deadline: how long a step or a model load under way may still take


class Engine:
    def __init__(self, config: WorkerConfig, probe_factory: ProbeFactory = probe_for):
        set_offline_environment()
        self.config = config
        self.started_at = time.time()
        self.store = StateStore(config.resolved_state_path)
        try:
            self._start(config, probe_factory)
        except BaseException:
            self.store.close()  # a worker that never started must not keep the state file locked
            raise

    def _start(self, config: WorkerConfig, probe_factory: ProbeFactory) -> None:
        self.book = StateBook([self.store.record_event])  # first listener: on disk before anything else
        self.board = ProgressBoard(config.board_slots)
        self.models = ModelCatalog(config.models, config.resolved_model_cache_dir)
        self.workflows = WorkflowCatalog(config.workflows_dir, model_known=self._model_known)
        self.outputs = OutputStore(config.limits.max_image_side, config.resolved_output_dir, config.raw_pixels_dir,
                                   self.store if self.store.durable else None)
        self.planner = Planner(config, self.models, self.outputs)
        self.cpu = ThreadPoolExecutor(config.scheduling.cpu_threads, thread_name_prefix="ew-post")
        self.pool = DevicePool(config, self.models, on_resize=self._resized, probe_factory=probe_factory)
        self.sessions = SessionService(self)
        self.batches = BatchService(self)
        self._closing = threading.Event()
        self._close_lock = threading.Lock()  # a racing second close waits for the first
        self._pruned_at = 0.0
        self._pruning = threading.Lock()  # one prune at a time
        self.book.listeners.append(self._maybe_prune)
        self.pool.start()
        self.pool.on_every_worker(lambda worker: worker.pipeline(config.default_model))  # warm, not awaited
        self.recovery_report = recover(self)
        self.prune()

    def _model_known(self, model_id: str) -> bool:
        try:
            self.models.entry(model_id)
            return True
        except NotFound:
            return False

    def _resized(self, groups: set, size: int, reason: str) -> None:
        self.batches.resized(groups, size, reason)

    # ---- checks and estimates shared by sessions and batches ------------------------------

    def ensure_open(self) -> None:
        if self._closing.is_set():
            raise Unavailable("the worker is closing and accepts no new work")

    def wait_final(self, record) -> None:
        """Block a `background: false` caller until its work is final; a close that suspended it first
        is the caller's answer too."""
        if not self.book.wait_final(record):
            raise Unavailable(f"the worker closed before {record.label()} finished; it was suspended and "
                              "resumes at the next start", details={"status": record.status})

    def check_capacity(self, adding: int) -> None:
        with self.book.lock:
            open_work = sum(1 for r in self.book.sessions.values() if r.status not in FINAL)
            open_work += sum(1 for r in self.book.items.values() if r.status not in FINAL)
        limit = self.config.limits.max_queued_work
        if open_work + adding > limit:
            raise ResourceExhausted(
                f"the queue is full: {open_work} unfinished sessions and items, limit {limit}; retry later"
            )

    def native_size(self, model_id: str) -> tuple[int, int]:
        return self.models.native_size(model_id)

    def estimate(self, plan: RunPlan, fallback_seconds: float) -> tuple[float, float]:
        """(queue wait, run time) in seconds from measured step times; the fallback before any."""
        per_step = self.pool.seconds_per_step()
        steps = max((getattr(s.params, "steps", 0) for s in plan.steps if s.operation.on_device), default=0)
        if per_step is None:
            return 0.0, fallback_seconds
        batch = self.config.scheduling.max_batch_size
        queued_forwards = self.pool.pending() / batch
        return queued_forwards * steps * per_step, steps * per_step

    # ---- retention ------------------------------------------------------------------------

    def _maybe_prune(self, record, event: str) -> None:
        """After a session or batch finishes: prune on the CPU pool, at most every PRUNE_INTERVAL."""
        if record.kind == "item" or record.status not in FINAL or self._closing.is_set():
            return
        now = time.monotonic()
        if now - self._pruned_at >= PRUNE_INTERVAL_SECONDS or \
                len(self.book.sessions) + len(self.book.batches) > self.config.retention.max_finished:
            self._pruned_at = now
            self.cpu.submit(self.prune)

    def prune(self) -> int:
        """Delete the oldest finished sessions and batches beyond the count or past the age; their files too."""
        with self._pruning:
            return self._prune()

    def _prune(self) -> int:
        retention = self.config.retention
        with self.book.lock:
            finished = sorted((r for r in [*self.book.sessions.values(), *self.book.batches.values()]
                               if r.status in FINAL), key=lambda r: r.completed_at or 0.0)
        cutoff = time.time() - retention.max_age_hours * 3600
        excess = max(0, len(finished) - retention.max_finished)
        victims = [r for i, r in enumerate(finished) if i < excess or (r.completed_at or 0.0) < cutoff]
        for record in victims:
            try:
                if record.kind == "session":
                    self.sessions.delete(parse(DeleteSessionRequest, {"session_id": record.id}))
                else:
                    self.batches.delete(parse(DeleteBatchRequest, {"batch_id": record.id}))
            except NotFound:
                pass  # the caller deleted it meanwhile
        if victims:
            log.info("retention: pruned %d finished sessions and batches", len(victims))
        return len(victims)

    # ---- status and close ----------------------------------------------------------------

    def status(self) -> dict:
        pool = self.pool.status()
        sessions = self.book.counts("session")
        batches = self.book.counts("batch")
        return {
            "device": {"devices": pool["workers"], "memory": pool["memory"]},
            "model": {"models": self.models.ids(), "default_model": self.config.default_model},
            "inference": {"queued_images": pool["queued_images"],
                          "active_images": sum(w["active_images"] for w in pool["workers"])},
            "postprocessing": {"threads": self.config.scheduling.cpu_threads},
            "processing": {"sessions": sessions, "batches": batches, "outputs": self.outputs.count(),
                           "workflows": len(self.workflows.describe_all()),
                           "workflow_problems": self.workflows.problems()},
            "recovery": self.recovery_report,
            "state": {"path": self.store.path, "durable": self.store.durable,
                      "quarantined_rows": self.store.quarantined()},
            "uptime_seconds": round(time.time() - self.started_at, 3),
            "closing": self._closing.is_set(),
        }

    def close(self, timeout: float, pending: str) -> bool:
        """Refuse new work, then per `pending`: "suspend" keeps unfinished work stored for the next start,
        "cancel" cancels it, "finish" lets it finish within `timeout` and suspends the rest. The device
        threads stop at their next step boundary and are joined, past `timeout` if a step is still under
        way (up to STOP_GRACE_SECONDS); True when every thread has ended. Callers waiting for work get
        their answer. The store closes only once nothing can write to it any more."""
        with self._close_lock:
            if self._closing.is_set():
                return self.threads_stopped()
            self._closing.set()
            deadline = time.monotonic() + timeout
            if pending == "finish":
                self.book.wait_until(self._all_final, timeout)
            if pending == "cancel":
                self.sessions.cancel_all()
                self.batches.cancel_all()
            else:
                self.book.freeze()  # what is still unfinished stays as stored, to resume at the next start
            stopped = self.pool.close(max(0.0, deadline - time.monotonic()), STOP_GRACE_SECONDS)
            self.cpu.shutdown(wait=True, cancel_futures=True)
            if stopped:
                self.store.close()
            else:
                log.error("device threads did not stop within %.0f s of the deadline; the state file stays open",
                          STOP_GRACE_SECONDS)
            return stopped

    def threads_stopped(self) -> bool:
        return not any(worker.thread.is_alive() for worker in self.pool.workers)

    def _all_final(self) -> bool:
        with self.book.lock:
            return all(r.status in FINAL for r in [*self.book.sessions.values(), *self.book.items.values()])
