"""Shared fixtures: one built-in model cache per test session, a fresh worker per test.

Everything runs on the real tiny diffusers pipeline on this machine's CPU.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from embedded_worker import ProcessingWorker, WorkerConfig, testing
from embedded_worker.diffusion.tiny_model import ensure_tiny_model
from embedded_worker.lifecycle.state import WorkState


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("models")
    ensure_tiny_model("builtin:tiny-sd", folder)
    return folder


@pytest.fixture
def make_worker(model_cache, tmp_path):
    """Build workers with test-friendly defaults; every one is closed after the test."""
    made: list[ProcessingWorker] = []

    def make(**overrides) -> ProcessingWorker:
        # the random tiny-sd, not the trained default: these tests check mechanics and pixel identity, cheaply
        settings = {"model_cache_dir": str(model_cache), "workflows_dir": None, "state_path": ":memory:",
                    "default_model": "builtin:tiny-sd"}
        scheduling = {"coalesce_wait_ms": 5.0, **overrides.pop("scheduling", {})}
        settings.update(overrides)
        worker = ProcessingWorker(WorkerConfig.model_validate({**settings, "scheduling": scheduling}))
        made.append(worker)
        return worker

    yield make
    for worker in made:
        assert worker.close(timeout=30)["success"]


@pytest.fixture
def worker(make_worker) -> ProcessingWorker:
    return make_worker()


@pytest.fixture
def durable(model_cache, tmp_path):
    """Workers on one state file, opened one after another like successive processes."""
    made: list[ProcessingWorker] = []

    def open_worker(**overrides) -> ProcessingWorker:
        settings = {"model_cache_dir": str(model_cache), "state_path": str(tmp_path / "state" / "state.sqlite3"),
                    "default_model": "builtin:tiny-sd", **overrides}
        worker = ProcessingWorker(WorkerConfig.model_validate(settings))
        made.append(worker)
        return worker

    yield open_worker
    for worker in made:
        worker.close(timeout=30)


def generate(worker: ProcessingWorker, session_id: str | None = None, background: bool = False, **parameters) -> dict:
    """Run img-generation-basic with small defaults and return the reply."""
    params = {"prompt": "a red fox in the snow", "seed": 7, "steps": 6, **parameters}
    request = {"workflow_id": "img-generation-basic", "parameters": params, "background": background}
    if session_id is not None:
        request["session_id"] = session_id
    return worker.execute_workflow(request)


def wait_for(predicate, timeout: float = 300.0, interval: float = 0.005):
    """Poll `predicate` until it returns a truthy value; fail the test on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout} s")


def settle(worker: ProcessingWorker, session_ids, timeout: float = 120.0) -> dict[str, dict]:
    """Resume whatever a control storm left paused (a pause may land after any one check) until
    every session is final; their final statuses."""
    def final_or_resumed(session_id: str) -> bool:
        status = worker.get_session_status(session_id=session_id)
        if status.get("status") == "paused":
            worker.control_session(session_id=session_id, action="resume")
        return status.get("status") in ("completed", "failed", "cancelled")

    wait_for(lambda: all([final_or_resumed(s) for s in session_ids]), timeout=timeout, interval=0.05)
    return {s: worker.get_session_status(session_id=s) for s in session_ids}


def session_status(worker: ProcessingWorker, session_id: str) -> dict:
    reply = worker.get_session_status(session_id=session_id)
    assert reply["success"], reply
    return reply


def run_of(worker: ProcessingWorker, session_id: str):
    """The WorkflowRun doing a session's work now (None before it exists)."""
    return testing.run_of(worker, session_id)


def device_worker(worker: ProcessingWorker):
    return testing.device_workers(worker)[0]


def pipeline_of(worker: ProcessingWorker, model_id: str = "builtin:tiny-sd"):
    """The pipeline the device worker itself uses (loaded on its thread, then only read here)."""
    return device_worker(worker).call(lambda w: w.pipeline(model_id)[0]).result(timeout=60)


class StepGate:
    """Holds the device at the boundary after its Nth step (the device worker's step hook) until a pause of a
    session has been asked for, so the pause lands at that boundary however slow the machine is (no race
    between a poll and a step)."""

    def __init__(self, worker: ProcessingWorker, forwards: int):
        self.worker, self.forwards, self.count = worker, forwards, 0
        self.reached, self.release = threading.Event(), threading.Event()
        self.remove = testing.on_step(worker, self._hook)

    def _hook(self, _device) -> None:
        self.count += 1
        if self.count == self.forwards:
            self.reached.set()
            self.release.wait(300)

    def pause(self, session_id: str) -> dict:
        assert self.reached.wait(300), "the session never reached the step"
        replies: list[dict] = []
        pausing = threading.Thread(target=lambda: replies.append(
            self.worker.control_session(session_id=session_id, action="pause")))
        pausing.start()
        run = run_of(self.worker, session_id)
        wait_for(lambda: run.state in (WorkState.PAUSING, WorkState.PAUSED))
        self.release.set()
        pausing.join(300)
        return replies[0]

    def __enter__(self) -> "StepGate":
        return self

    def __exit__(self, *exc_info) -> None:
        self.release.set()
        self.remove()


def assert_same_up_to_batch_rounding(a, b) -> None:
    """Equal but for what batched kernels' rounding can do: at most 1/255, on at most 0.1 % of values.

    An image that shared forwards with other images went through matrix
    kernels of other shapes than its solo run; they round differently in the
    last float bit (seen here: 3 values of 196,608 off by one). A wrong seed,
    prompt or scheduler state changes nearly every value by far more.
    """
    import numpy as np

    assert a.shape == b.shape and a.dtype == b.dtype
    difference = np.abs(a.astype(np.int16) - b.astype(np.int16))
    assert difference.max() <= 1, f"max difference {difference.max()}"
    assert (difference > 0).mean() <= 1e-3, f"{(difference > 0).sum()} values differ"
