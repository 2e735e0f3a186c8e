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
from .sessions import SessionService
from .state import FINAL, StateBook
from .workflows.catalog import WorkflowCatalog

log = logging.getLogger("embedded_worker")


class Engine:
    def __init__(self, config: WorkerConfig, probe_factory: ProbeFactory = probe_for):
        set_offline_environment()
        self.config = config
        self.started_at = time.time()
        self.book = StateBook()
        self.board = ProgressBoard(config.board_slots)
        self.models = ModelCatalog(config.models, config.resolved_model_cache_dir)
        self.workflows = WorkflowCatalog(config.workflows_dir, model_known=self._model_known)
        self.outputs = OutputStore(config.limits.max_image_side)
        self.planner = Planner(config, self.models, self.outputs)
        self.cpu = ThreadPoolExecutor(config.scheduling.cpu_threads, thread_name_prefix="ew-post")
        self.pool = DevicePool(config, self.models, on_resize=self._resized, probe_factory=probe_factory)
        self.sessions = SessionService(self)
        self.batches = BatchService(self)
        self._closing = threading.Event()
        self.pool.start()
        self.pool.on_every_worker(lambda worker: worker.pipeline(config.default_model))  # warm, not awaited

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

    # ---- status and close ----------------------------------------------------------------

    def status(self) -> dict:
        pool = self.pool.status()
        sessions = self.sessions.counts()
        batches = self.batches.counts()
        return {
            "device": {"devices": pool["workers"], "memory": pool["memory"]},
            "model": {"models": self.models.ids(), "default_model": self.config.default_model},
            "inference": {"queued_images": pool["queued_images"],
                          "active_images": sum(w["active_images"] for w in pool["workers"])},
            "postprocessing": {"threads": self.config.scheduling.cpu_threads},
            "processing": {"sessions": sessions, "batches": batches, "outputs": self.outputs.count(),
                           "workflows": len(self.workflows.describe_all()),
                           "workflow_problems": self.workflows.problems()},
            "uptime_seconds": round(time.time() - self.started_at, 3),
            "closing": self._closing.is_set(),
        }

    def close(self, timeout: float) -> bool:
        """Refuse new work, cancel what is unfinished, stop every thread; True if all stopped in time."""
        if self._closing.is_set():
            return not any(w.thread.is_alive() for w in self.pool.workers)
        self._closing.set()
        deadline = time.monotonic() + timeout
        self.sessions.cancel_all()
        self.batches.cancel_all()
        joined = self.pool.close(max(0.0, deadline - time.monotonic()))
        self.cpu.shutdown(wait=True, cancel_futures=True)
        return joined
