"""RemoteDeviceWorker: a device worker whose device is a Ray actor; its thread runs on the head.

Design notes
- Every decision (priority, aging, fair share, batch limits, which images
  go together) is taken here on the head, by the local workers' `Admission`
  over the same WorkQueue; the actor only coalesces what it was handed into
  forwards (its own DevicePool), in the order given.
- A bounded window: at most `in_flight_per_actor` images on one actor.
  Admission is not told to preempt on an actor (`preempt=False`): a more
  urgent image waits for a free place in the window, or runs locally.
- The thread launches, polls and hands off: images go out as one `run`
  call each (the actor coalesces them), results come back through
  `ray.wait` every POLL_SECONDS, and so does progress (one `progress` call
  in flight at a time). What happened to each image is posted to the
  lifecycle loop, as from a local worker.
- Pause and cancel reach the actor at its next step boundary (its pool's
  own); a paused image's state comes back to the head, as every image's
  does every few steps, and at a suspending close every image out pauses
  there (`outcomes`). Preemption never parks a remote image.
- An actor that dies (ActorDiedError, a killed process, a lost node) takes
  no work with it: its images go back to the queue at their old rank, from
  the last state the head holds, the crash is logged with the actor's name
  and node, and a fresh actor replaces it. Completion is recorded on the head
  only (`outcomes`), through each image's future, once.
- A lost head (the connection's `HeadWatch` decides) is not an actor's
  death: Ray calls (inside `connection.using_ray()`) raise `HeadLost`; the
  images out go back to the queue for local devices (or fail unavailable
  without any), and the worker takes nothing until the head is back, then
  asks for a fresh actor.
- Pixels: one copy into the object store, a read-only view, one copy to our heap (`outcomes.complete`).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import Counter
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from ..diffusion.active_set import announce_start, tell_listeners
from ..diffusion.device_worker import WorkerCounters
from ..diffusion.memory import MemoryReading
from ..diffusion.task import PAUSE
from ..diffusion.worker_thread import WorkerThread
from ..errors import Unavailable
from . import outcomes
from .connection import HeadLost

if TYPE_CHECKING:
    from ..diffusion.active_set import OnDeviceMark
    from ..diffusion.admission import Admission
    from ..diffusion.checkpoint_cadence import CheckpointSink
    from ..diffusion.memory import MemoryMonitor
    from ..diffusion.task import DenoiseTask
    from ..diffusion.work_queue import WorkQueue
    from .connection import ClusterConnection

log = logging.getLogger("embedded_worker.cluster")
POLL_SECONDS = 0.05  # results and progress cross processes: looked for this often while images are out
READY_TIMEOUT_SECONDS = 300.0  # a fresh actor imports torch and diffusers


@dataclass(frozen=True)
class RemoteDevice:
    """What a remote worker shows where a local one shows its torch.device."""

    actor: str
    type: str = "ray"

    def __str__(self) -> str:
        return f"ray:{self.actor}"


class RemoteDeviceWorker(WorkerThread):
    def __init__(self, name: str, index: int, spawn: Callable[[str], object], connection: ClusterConnection,
                 queue: WorkQueue, admission: Admission, monitor: MemoryMonitor, events: Executor,
                 mark_on_device: OnDeviceMark, window: int, checkpoints: CheckpointSink | None):
        super().__init__(name, queue)
        self.index = index
        self.connection = connection
        self.admission = admission
        self.sizer = admission.sizer
        self.monitor = monitor
        self.events = events
        self.mark_on_device = mark_on_device
        self.window = window
        self.checkpoints = checkpoints  # the head's: states that come back are written as checkpoints too
        self._spawn = spawn  # actor name -> a new actor handle
        self.actor_name, self.actor = "", None
        self.node_id, self.actor_pid = None, None  # where the current actor runs, once ready
        self.device = RemoteDevice(name)
        self.counters = WorkerCounters()
        self.resizes: Counter = Counter()  # remote forwards do not resize under the head's eyes
        self.seconds_per_step: float | None = None
        self.loading, self.load_errors = None, {}  # the model being loaded; model id -> why its last load failed
        self.actor_deaths = 0
        self._loaded: list[str] = []
        self._in_flight: dict[object, DenoiseTask] = {}  # ObjectRef -> image; the thread only
        self._keys: dict[int, str] = {}  # id(task) -> its key on the actor; the thread only
        self._leave_sent: dict[int, str] = {}  # id(task) -> the leave (pause, cancel) forwarded; the thread only
        self._progress_ref = None
        self._ready = False  # the current actor answered `ready`; the thread only
        with connection.using_ray():
            self._new_actor()

    # ---- other threads -------------------------------------------------------------------

    @property
    def active_images(self) -> int:
        return len(self._in_flight)

    @property
    def capacity(self) -> int:
        return self.window

    def status(self) -> dict:
        return {
            "name": self.name,
            "device": str(self.device),
            "dtype": "remote",
            "actor": self.actor_name,
            "node_id": self.node_id,
            "loaded_models": list(self._loaded),
            "active_images": self.active_images,
            "capacity": self.capacity,
            "seconds_per_step": self.seconds_per_step,
            **{name: getattr(self.counters, name) for name in ("forwards", "images_done", "cohorts_started")},
            **dict.fromkeys(("preemptions", "preempted_images", "out_of_memory_events"), 0),  # not on an actor
            "actor_deaths": self.actor_deaths,
        }

    # ---- on this worker's thread: models -------------------------------------------------------

    def load(self, model_id: str) -> None:
        """Load `model_id` on the actor (there is no pipeline on the head)."""
        import ray

        self.loading = model_id
        try:
            with self.connection.using_ray():
                self._loaded = ray.get(self.actor.load.remote(model_id))
        except Exception as error:
            self.load_errors[model_id] = f"{self.actor_name}: {type(error).__name__}: {error}"
            raise Unavailable(self.load_errors[model_id]) from error
        finally:
            self.loading = None
        self.load_errors.pop(model_id, None)

    def unload(self, model_id: str) -> bool:
        import ray

        with self.connection.using_ray():
            unloaded = ray.get(self.actor.unload.remote(model_id))
        self._loaded = [m for m in self._loaded if m != model_id]
        return unloaded

    # ---- the worker thread -----------------------------------------------------------------

    def _new_actor(self) -> None:
        """Inside `using_ray`."""
        self.actor_name = f"{self.name}-{uuid.uuid4().hex[:8]}"
        self.actor = self._spawn(self.actor_name)
        self.node_id = self.actor_pid = None
        self._progress_ref = None
        self._ready = False

    def _wait_ready(self) -> bool:
        """Inside `using_ray`: until the actor answers (True), or the worker stops (False); HeadLost when the
        head is lost meanwhile."""
        import ray

        ready_ref = self.actor.ready.remote()
        deadline = time.monotonic() + READY_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            with self.queue.cond:
                if self._stopping:
                    return False
                if not self.connection.connected:
                    raise HeadLost(f"the Ray head was lost while actor {self.actor_name} started")
            done, _ = ray.wait([ready_ref], timeout=0.2)
            if done:
                info = ray.get(ready_ref)
                self.node_id, self.actor_pid = info["node_id"], info["pid"]
                self._ready = True
                log.info("%s: actor %s ready on node %s (pid %s)", self.name, self.actor_name, self.node_id,
                         info["pid"])
                return True
        raise Unavailable(f"actor {self.actor_name} did not start within {READY_TIMEOUT_SECONDS:.0f} s")

    def _run(self) -> None:
        from ray.exceptions import RayActorError

        while True:
            if not self._ready:
                try:
                    if not self._start_actor():
                        break
                except Exception:
                    log.exception("%s: actor %s never became ready; this worker takes no work", self.name,
                                  self.actor_name)
                    break
                continue
            admitted = self._admit()
            if admitted is None:
                break
            try:
                with self.connection.using_ray():
                    self._run_calls()
                    self._send(admitted)
                    self._forward_leaving()
                    self._collect()
                    self._poll_progress()
            except HeadLost:
                self._head_lost(also=admitted)
            except RayActorError as error:
                if self.connection.connected:
                    self._actor_died(error, also=admitted)
                else:  # the actor went with the head
                    self._head_lost(also=admitted)
            except Exception as error:  # a bug must cost the images in flight, never the thread
                log.exception("%s: unexpected error; failing the images in flight", self.name)
                outcomes.fail(self.queue, list(self._in_flight.values()), error, self.name)
                self._in_flight.clear()
        self._shutdown()

    def _start_actor(self) -> bool:
        """Wait until the head is connected (calls asked meanwhile are refused: they need the actor), ask for
        an actor unless one is already asked for, and wait until it is ready. False when stopping."""
        while True:
            with self.queue.cond:
                while not (self._stopping or self._calls or self.connection.connected):
                    self.queue.cond.wait()
                if self._stopping:
                    return False
                connected = self.connection.connected
            if not connected:
                self._run_calls()  # each raises HeadLost into its caller's future
                continue
            try:
                with self.connection.using_ray():
                    if self.actor is None:
                        self._new_actor()
                    return self._wait_ready()
            except HeadLost:
                self._head_lost()

    def _admit(self) -> list[DenoiseTask] | None:
        """What joins the window now; waits only while nothing is out. None when stopping."""
        with self.queue.cond:
            while True:
                if self._stopping:
                    return None
                if self._calls or not self.connection.connected:
                    return []  # a lost head: the next Ray call raises HeadLost
                taken, wait = self.admission.decide(list(self._in_flight.values()))
                if taken is None:
                    if self._in_flight:
                        return []
                    self.queue.cond.wait(wait)
                    continue
                for task in taken:
                    task.mark_active(self.name)
                return taken

    def _send(self, tasks: list[DenoiseTask]) -> None:
        if not tasks:
            return
        announce_start(self.name, tasks, set(), self.mark_on_device, self._tell)  # an actor cannot end the head
        self.counters.cohorts_started += 1
        for task in tasks:
            key = uuid.uuid4().hex
            self._keys[id(task)] = key
            task.step = task.resume_from.step if task.resume_from is not None else 0
            ref = self.actor.run.remote(key, task.spec, task.priority, outcomes.resume_of(task))
            self._in_flight[ref] = task

    def _forward_leaving(self) -> None:
        """Pause and cancel asked on the head reach the actor, which applies them at its next step boundary."""
        for task in list(self._in_flight.values()):
            if task.leaving is not None and self._leave_sent.get(id(task)) != task.leaving:
                self._leave_sent[id(task)] = task.leaving
                (self.actor.pause if task.leaving == PAUSE else self.actor.cancel).remote(self._keys[id(task)])

    def _collect(self) -> None:
        import ray
        from ray.exceptions import RayActorError, RayTaskError

        refs = list(self._in_flight)
        if not refs:
            return
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=POLL_SECONDS)
        for ref in ready:
            task = self._in_flight[ref]
            try:
                view = ray.get(ref)  # read-only, in the object store: no copy yet
            except RayActorError:
                raise  # the actor is gone: every image on it goes back to the queue
            except RayTaskError as error:
                del self._in_flight[ref]
                self._forget(task)
                if outcomes.ended_without_pixels(self.queue, task, error, f"{self.name} ({self.actor_name})"):
                    self._tell(lambda listener, parked: listener.task_parked(parked), [task])
                continue
            del self._in_flight[ref]
            self._forget(task)
            if isinstance(view, tuple):  # paused there: its state came back instead of pixels
                if outcomes.parked_there(self.queue, task, view):
                    self._tell(lambda listener, parked: listener.task_parked(parked), [task])
                continue
            outcomes.complete(self.queue, task, view)
            self.counters.images_done += 1

    def _poll_progress(self) -> None:
        import ray

        if not self._in_flight:
            return
        if self._progress_ref is None:
            self._progress_ref = self.actor.progress.remote()
            return
        done, _ = ray.wait([self._progress_ref], timeout=0)
        if not done:
            return
        report, self._progress_ref = ray.get(self._progress_ref), None
        self.seconds_per_step = report["seconds_per_step"]
        self._loaded = report["loaded_models"]
        memory = report["memory"]
        self.monitor.probe.reading = MemoryReading(memory["used_bytes"], memory["total_bytes"])
        moved = outcomes.progressed({self._keys.get(id(t)): t for t in self._in_flight.values()}, report,
                                    self.checkpoints)
        if moved:
            self.counters.steps += 1
            self._tell(lambda listener, task: listener.task_stepped(task), moved, once_per_listener=True)

    def _actor_died(self, error: Exception, also: list[DenoiseTask] = ()) -> None:
        """Every image that was on the actor goes back to the queue (same spec, same seed); a new actor
        takes its place."""
        import ray

        tasks = list(self._in_flight.values()) + [t for t in also if t not in self._in_flight.values()]
        self._in_flight.clear()
        for task in tasks:
            self._forget(task)
        self.actor_deaths += 1
        log.error("%s: actor %s (pid %s) on node %s died (%s); %d images go back to the queue", self.name,
                  self.actor_name, self.actor_pid, self.node_id, type(error).__name__, len(tasks))
        parked = outcomes.take_back(self.queue, tasks)
        if parked:
            self._tell(lambda listener, task: listener.task_parked(task), parked)
        try:
            with self.connection.using_ray():
                try:
                    ray.kill(self.actor, no_restart=True)
                except Exception:  # already gone
                    pass
                self._new_actor()  # `_run` waits until it is ready
        except HeadLost:  # the head went too: a fresh actor once it is back
            self.actor, self._ready = None, False

    def _head_lost(self, also: list[DenoiseTask] = ()) -> None:
        """The head is lost: the images that were on the actor go back to the queue for this machine's devices
        (or fail as unavailable without them); the actor is forgotten (it went with the head, or its node
        ends it) and a fresh one is asked for once the head is back."""
        tasks = list(self._in_flight.values()) + [t for t in also if t not in self._in_flight.values()]
        self._in_flight.clear()
        for task in tasks:
            self._forget(task)
        self.actor, self._ready, self._loaded = None, False, []
        self.node_id = self.actor_pid = self._progress_ref = None
        if tasks:
            log.warning("%s: the Ray head is lost; %d images that were on actor %s go %s", self.name, len(tasks),
                        self.actor_name, "back as unavailable" if self.connection.refusal() else "back to the queue")
        parked = outcomes.take_back(self.queue, tasks, self.connection.refusal)
        if parked:
            self._tell(lambda listener, task: listener.task_parked(task), parked)

    def _forget(self, task: DenoiseTask) -> None:
        self._keys.pop(id(task), None)
        self._leave_sent.pop(id(task), None)

    def _tell(self, tell: Callable, tasks: list[DenoiseTask], once_per_listener: bool = False) -> None:
        self.events.submit(tell_listeners, self.name, tell, tasks, once_per_listener)  # as ActiveSet.tell

    def _shutdown(self) -> None:
        import ray

        self._refuse_calls()
        if self.suspending and self.checkpoints is not None and self._in_flight and self.connection.connected:
            outcomes.park_for_suspend(f"{self.name} ({self.actor_name})", self.connection, self.actor,
                                      self._in_flight, self._keys, self.checkpoints, self.seconds_per_step)
        tasks, self._in_flight = list(self._in_flight.values()), {}
        outcomes.fail(self.queue, tasks, Unavailable("the worker closed before this image finished"), self.name)
        try:
            with self.connection.using_ray():
                ray.kill(self.actor, no_restart=True)
        except Exception:  # already gone, the head is lost, or the driver already disconnected
            pass
