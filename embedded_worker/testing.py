"""The one supported seam behind the facade, for tests, benchmarks and soaks.

The facade answers what a caller may ask. Tests also need to wait for a
condition without polling, to hold the device at a step boundary, to count
what the devices did and to look at the state store. All of that is here,
so a test never walks the engine's attributes, and the engine can change
without breaking them. Nothing here writes work state: waits go through the
lifecycle loop, hooks run on a device thread and only observe or hold it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from .api.facade import ProcessingWorker



def wait_until(worker: ProcessingWorker, predicate: Callable[[], bool], timeout: float) -> bool:
    """Block until `predicate()` holds after some change of work state (the loop checks it), or `timeout`."""
    return worker._engine.loop.wait_for(predicate, timeout)


def on_step(worker: ProcessingWorker, hook: Callable, device: int = 0) -> Callable[[], None]:
    """Call `hook(device_worker)` on the device thread after each of its forwards, before the step boundary
    (holding it holds the device there); returns the way to remove it."""
    hooks = device_workers(worker)[device].step_hooks
    hooks.append(hook)
    return lambda: hooks.remove(hook)


def calls_waiting(device_worker) -> int:
    """Calls (a model load, ...) queued for a device worker's thread: it runs them at its next step boundary,
    so a step hook that holds the device must let it reach that boundary."""
    with device_worker.queue.cond:
        return len(device_worker._calls)


def device_workers(worker: ProcessingWorker) -> list:
    """The device workers, local and remote: names, counters, capacity, their pipelines (`call`)."""
    return worker._engine.pool.workers


def pending_images(worker: ProcessingWorker) -> int:
    """Images queued for a device and not yet taken."""
    return worker._engine.pool.pending()


def run_of(worker: ProcessingWorker, record_id: str):
    """The WorkflowRun doing a session's or an item's work now (None before it exists)."""
    return worker._engine.jobs.run_of(record_id)


def session_ids(worker: ProcessingWorker) -> set[str]:
    """Every session the worker holds, finished ones included (the facade lists at most a page)."""
    return set(worker._engine.book.sessions)


def state_store(worker: ProcessingWorker):
    """The StateStore: its rows, its write path (a full disk is faked under it)."""
    return worker._engine.store


def output_store(worker: ProcessingWorker):
    return worker._engine.outputs


def cluster(worker: ProcessingWorker):
    """The Ray connection (None without a cluster)."""
    return worker._engine.pool.cluster


def models(worker: ProcessingWorker):
    """The model catalog: register folders as the config would."""
    return worker._engine.models


def drain(worker: ProcessingWorker, timeout: float = 60.0) -> None:
    """Wait until what the CPU pool and then the lifecycle loop had queued before this call has been applied,
    and the checkpoint writes and removals handed over by then are done."""
    engine = worker._engine
    engine.cpu.submit(lambda: None).result(timeout)
    engine.loop.submit(lambda: None).result(timeout)
    engine.checkpoints.flush()


def held_for(worker: ProcessingWorker, owner_id: str) -> list[str]:
    """Where the worker still holds bookkeeping for `owner_id` (a session or batch id): empty once it is
    deleted (jobs, board rows, trackers, device resize counts)."""
    engine, places = worker._engine, []
    if any(record_id == owner_id or record_id.startswith(owner_id + "/") for record_id in list(engine.jobs._jobs)):
        places.append("jobs")
    if owner_id in engine.feed._published or owner_id in engine.feed._observers:
        places.append("progress feed")
    if any(owner_id in device.resizes for device in engine.pool.workers):
        places.append("device resizes")
    if owner_id in engine.book.sessions or owner_id in engine.book.batches:
        places.append("records")
    return places


def device_side_closed(worker: ProcessingWorker) -> bool:
    """The device pool refuses work from now on (a close reached it)."""
    return worker._engine.pool._closed


def stopping(device_worker) -> bool:
    """The device worker was asked to stop: it stops at its next step boundary."""
    with device_worker.queue.cond:
        return device_worker._stopping


def checkpoint_files(worker: ProcessingWorker, record_id: str) -> list:
    """The checkpoint files kept for a record's images now (after the writes handed over so far)."""
    checkpoints = worker._engine.checkpoints
    checkpoints.flush()
    folder = checkpoints.folder_of(record_id)
    return sorted(folder.glob("*.state")) if folder.exists() else []


def held_states(remote_worker) -> dict[str, int]:
    """A remote worker's images out on its actor whose state the head holds: record id -> that state's step."""
    return {task.record_id: task.resume_from.step for task in list(remote_worker._in_flight.values())
            if task.resume_from is not None}


def park_in_host_memory(worker: ProcessingWorker) -> None:
    """Paused images' states go to host memory as they do on an accelerator (on the CPU they are there
    already, so the worker does not move them): the GPU path, exercised here."""
    for device in device_workers(worker):
        device.active.offload_parked = True
