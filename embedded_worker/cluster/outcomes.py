"""What an actor's answers do to the images it was handed, on the head: their progress and states, and how
each ends: its pixels, a pause or cancel applied there, a failure, or its actor's death. Completion is recorded here, once, through the image's future; each state move is
made under the queue's lock, as everywhere else.

The head holds the newest denoise state of every image out on an actor
(`keep_states`: it comes back with the progress polls, every few steps,
and a paused image's `run` answers with it), as the image's `resume_from`.
So a paused image resumes at its step, and a dead actor's or node's images
continue from the head's last state, on whichever worker takes them next;
with durable state the head writes them as checkpoints too.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Callable

import numpy as np

from ..diffusion.resume_points import HeldState
from ..diffusion.task import CANCEL, DONE, PARKED, PAUSE
from ..errors import Cancelled, InternalError, Unavailable, WorkerError

if TYPE_CHECKING:
    from ..diffusion.task import DenoiseTask
    from ..diffusion.work_queue import WorkQueue

log = logging.getLogger("embedded_worker.cluster")


def complete(queue: WorkQueue, task: DenoiseTask, view: np.ndarray) -> None:
    """`view`: the read-only array `ray.get` gave, inside the object store. The head's one copy takes the
    pixels out of it, so an output never points into the store after the driver disconnects."""
    pixels = np.array(view, copy=True)
    pixels.setflags(write=False)
    with queue.cond:
        task.state = DONE
        task.leaving = None
    task.step = task.total_steps
    task.eta_seconds = 0.0
    task.finished_at = time.monotonic()
    if not task.future.done():
        task.future.set_result(pixels)


def resume_of(task: DenoiseTask) -> tuple[int, bytes] | None:
    """What an actor's `run` continues from: (step, state bytes), or None for step 0."""
    held = task.resume_from
    return (held.step, held.read()) if held is not None else None


def progressed(tasks: dict[str, DenoiseTask], report: dict, checkpoints) -> list[DenoiseTask]:
    """An actor's progress report (`DenoiseActor.progress`) on the head's images (its key -> image): their
    step, steps in all and ETA, and the states it took (`keep_states`). The images whose step moved."""
    keep_states(tasks, report["states"], checkpoints)
    moved = []
    for key, task in tasks.items():
        state = report["images"].get(key)
        if state is not None and (state[0] != task.step or state[1] != task.total_steps):
            task.step, task.total_steps, task.eta_seconds, resumed = state
            task.resumed_from_step = resumed if resumed is not None else task.resumed_from_step
            moved.append(task)
    return moved


def keep_states(tasks: dict[str, DenoiseTask], states: dict[str, tuple[int, bytes]], checkpoints) -> None:
    """States an actor took (its key -> (step, bytes)): each image's newest, held on the head to continue from,
    and written as its checkpoint when the head keeps them (`checkpoints`, durable state)."""
    for key, state in states.items():
        task = tasks.get(key)
        if task is not None:
            _hold(task, state, checkpoints)


def _hold(task: DenoiseTask, state: tuple[int, bytes], checkpoints) -> None:
    """The head keeps `state` (step, bytes) as the image's newest, to continue from, and writes it as its
    checkpoint when it keeps them (`checkpoints`, durable state)."""
    task.resume_from = HeldState(*state)
    if checkpoints is not None and task.checkpoint_key is not None:
        checkpoints.save(task.record_id, task.checkpoint_key, task.resume_from)


def parked_there(queue: WorkQueue, task: DenoiseTask, state: tuple[int, bytes]) -> bool:
    """Paused on the actor: its `run` answered with (step, state bytes) (empty bytes: it never started). True
    when the image is now parked (resumed meanwhile, it waits in the queue instead, from that state)."""
    if state[1]:
        task.resume_from = HeldState(*state)
    with queue.cond:
        return _settle(queue, task)


def ended_without_pixels(queue: WorkQueue, task: DenoiseTask, error: Exception, where: str) -> bool:
    """The actor's run ended in an error: Cancelled when the head asked it to leave, else a failure.
    True when the image is now parked (its listener is to hear so)."""
    cause = getattr(error, "cause", None)
    if not isinstance(cause, Cancelled):
        fail(queue, [task], cause if isinstance(cause, WorkerError) else error, where)
        return False
    with queue.cond:
        return _settle(queue, task)


def take_back(queue: WorkQueue, tasks: list[DenoiseTask],
              refusal: Callable[[], WorkerError | None] = lambda: None) -> list[DenoiseTask]:
    """A dead actor's images: back in the queue at their old rank, from their spec (same seed), unless a
    pause or cancel was already asked for them, or `refusal()` (asked under the queue's lock) says why
    nothing may wait there now: then they fail with it. The ones now parked."""
    parked, refused = [], []
    with queue.cond:
        error = refusal()
        for task in tasks:
            if task.state != "active":
                continue
            if error is not None and task.leaving is None:
                task.state = DONE
                refused.append(task)
            elif _settle(queue, task):
                parked.append(task)
    for task in refused:
        if not task.future.done():
            task.future.set_exception(error)
    return parked


def _settle(queue: WorkQueue, task: DenoiseTask) -> bool:
    """With the queue's lock held: paused -> parked (True); cancelled, or the queue closed -> done;
    otherwise (never asked to leave, or resumed before the pause landed) -> queued again, from the state the
    head holds (step 0 without one)."""
    reason, task.leaving = task.leaving, None
    task.step, task.parked = task.resume_from.step if task.resume_from is not None else 0, None
    if reason == PAUSE:
        task.state = PARKED
        return True
    if reason == CANCEL or queue.closed:
        task.state = DONE
        if not task.future.done():
            task.future.set_exception(Cancelled("cancelled") if reason == CANCEL
                                      else Unavailable("the worker closed before this image finished"))
        return False
    queue.put(task)
    return False


def park_for_suspend(where: str, connection, actor, in_flight: dict, keys: dict[int, str], checkpoints,
                     seconds_per_step: float | None) -> None:
    """A suspending close: the images out on the actor (`in_flight`: ref -> image) pause there and their states
    come back and are written as checkpoints, so after a restart they continue at the step they reached, not
    at the head's last state (up to a checkpoint interval older). What does not answer within a few steps
    (10 s at most: the close has a deadline) keeps the head's last state."""
    import ray

    back = 0
    try:
        with connection.using_ray():
            for task in in_flight.values():
                actor.pause.remote(keys[id(task)])
            ready, _ = ray.wait(list(in_flight), num_returns=len(in_flight),
                                timeout=min(10.0, 1.0 + 3 * (seconds_per_step or 1.0)))
            for ref in ready:
                try:
                    answer = ray.get(ref)
                except Exception:  # cancelled or failed there: nothing to continue from
                    continue
                if isinstance(answer, tuple) and answer[1]:  # paused there: its state (empty: never started)
                    _hold(in_flight[ref], answer, checkpoints)
                    back += 1
    except Exception:  # the head or the actor went: the images keep the head's last states
        log.exception("%s: the images out could not be paused for the suspend", where)
    log.info("%s: %d of %d images out paused there for the suspend", where, back, len(in_flight))


def fail(queue: WorkQueue, tasks: list[DenoiseTask], error: BaseException, where: str) -> None:
    if not isinstance(error, WorkerError):
        log.error("%s: denoising failed: %s: %s", where, type(error).__name__, error)
        error = InternalError(f"{type(error).__name__}: {error}")
    for task in tasks:
        with queue.cond:
            task.state = DONE
        if not task.future.done():
            task.future.set_exception(error)
