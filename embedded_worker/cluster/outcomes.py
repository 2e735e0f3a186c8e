"""How an image handed to an actor ends on the head: its pixels, a pause or cancel applied there, a failure,
or its actor's death. Completion is recorded here, once, through the image's future; each state move is
made under the queue's lock, as everywhere else.

A paused image's denoising state stays behind on the actor (`parked` is
None): it starts again from step 0 when resumed, on whichever worker takes
it. Same seed, same pixels, up to batch rounding.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Callable

import numpy as np

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
    otherwise (never asked to leave, or resumed before the pause landed) -> queued again from step 0."""
    reason, task.leaving = task.leaving, None
    task.step, task.parked = 0, None
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


def fail(queue: WorkQueue, tasks: list[DenoiseTask], error: BaseException, where: str) -> None:
    if not isinstance(error, WorkerError):
        log.error("%s: denoising failed: %s: %s", where, type(error).__name__, error)
        error = InternalError(f"{type(error).__name__}: {error}")
    for task in tasks:
        with queue.cond:
            task.state = DONE
        if not task.future.done():
            task.future.set_exception(error)
