"""The job service on its own: one lifecycle for sessions and batch items, with a fake device pool.

`FakeDevicePool` is a fake (named as such): it stands in for the device side
so the test plays the device, deciding when an image starts and ends; it
posts its events to the lifecycle loop as the real device does. The loop,
the book, the store (SQLite in memory), the planner, the runs and the output
store are the real ones; the test acts as a caller does, through the loop
(`on_loop`).
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from embedded_worker.config import WorkerConfig
from embedded_worker.diffusion.models import ModelCatalog
from embedded_worker.diffusion.task import DONE, PARKED, QUEUED, BatchSizing
from embedded_worker.errors import Cancelled, InvalidState
from embedded_worker.lifecycle.checkpoints import Checkpoints
from embedded_worker.lifecycle.jobs import JobService
from embedded_worker.lifecycle.loop import LifecycleLoop
from embedded_worker.lifecycle.planning import Planner
from embedded_worker.lifecycle.state import (
    CANCELLED,
    COMPLETED,
    PAUSED,
    PENDING,
    RUNNING,
    ItemRecord,
    SessionRecord,
    StateBook,
)
from embedded_worker.lifecycle.store import StateStore
from embedded_worker.outputs.store import OutputStore
from embedded_worker.workflows.catalog import WorkflowCatalog

from .conftest import wait_for


class FakeDevicePool:
    """A fake device side: keeps what it was given; queued images park and cancel at once."""

    def __init__(self):
        self.lock = threading.Lock()
        self.tasks = []

    def submit(self, task):
        with self.lock:
            task.state = QUEUED
            self.tasks.append(task)

    def pause(self, task):
        if task.state == QUEUED:
            task.state = PARKED
            task.listener.task_parked(task)

    def resume(self, task):
        if task.state == PARKED:
            task.state = QUEUED

    def cancel(self, task):
        task.state = DONE
        if not task.future.done():
            task.future.set_exception(Cancelled("cancelled"))

    def play(self, task):
        """The device runs the image to its end: started (told on the loop, as the device tells), then its pixels."""
        task.listener.loop.call(task.listener.task_started, task)
        task.state = DONE
        task.future.set_result(np.full((32, 32, 3), 7, dtype=np.uint8))


@pytest.fixture
def service():
    config = WorkerConfig(default_model="builtin:tiny-sd", state_path=":memory:")
    store = StateStore(":memory:")
    loop = LifecycleLoop()
    book = StateBook(loop, [store.record_event])
    loop.after_each = book.emit
    loop.start()
    outputs = OutputStore(1024)
    cpu = ThreadPoolExecutor(2, thread_name_prefix="test-cpu")
    pool = FakeDevicePool()
    jobs = JobService(book, loop, pool, cpu, outputs, store, lambda model_id: (32, 32), on_progress=lambda job: None,
                      checkpoints=Checkpoints(store, enabled=False))
    planner = Planner(config, ModelCatalog(config.models, config.resolved_model_cache_dir), outputs)
    workflow = WorkflowCatalog(None, model_known=lambda model_id: True).take_for_run("img-generation-basic")
    jobs.test_plan = lambda seed: planner.for_workflow(workflow, {"prompt": "p", "steps": 2, "seed": seed})
    yield jobs
    cpu.shutdown(wait=True)
    loop.stop()
    store.close()


def on_loop(jobs: JobService, fn, *args):
    """What a caller does: one message to the lifecycle loop, its answer back."""
    return jobs.loop.call(fn, *args)


def admit(jobs: JobService, record, sizing=None):
    def admit_and_launch():
        job = jobs.admit(record, jobs.test_plan(record.priority), sizing)
        jobs.launch([job])
        return job

    return on_loop(jobs, admit_and_launch)


def submitted(jobs: JobService, count: int):
    return wait_for(lambda: len(jobs.pool.tasks) >= count and jobs.pool.tasks[count - 1])


def test_a_session_job_runs_pending_running_completed_and_keeps_its_outputs(service):
    record = SessionRecord(id="s1")
    job = admit(service, record)
    assert record.status == PENDING
    task = submitted(service, 1)
    assert task.record_id == "s1" and task.share_group == "s1"
    service.pool.play(task)
    wait_for(lambda: record.status == COMPLETED)
    assert len(record.outputs) == 1 and service.outputs.get(record.outputs[0]["output_id"]).pixels[0, 0, 0] == 7
    assert job.owner_id == "s1" and job.run.progress == 1.0
    (stored,) = [r for r in service.store.load_records() if r.id == "s1"]
    assert stored.status == COMPLETED and stored.outputs == record.outputs


def test_a_batch_item_is_the_same_kind_of_job_with_its_batch_as_owner(service):
    item = ItemRecord(id="b/i0", batch_id="b", item_id="i0")
    job = admit(service, item, BatchSizing("b", 4))
    task = submitted(service, 1)
    assert task.share_group == "b" and task.sizing.limit == 4
    service.pool.play(task)
    wait_for(lambda: item.status == COMPLETED)
    assert job.owner_id == "b" and service.outputs.get(item.outputs[0]["output_id"]).item_id == "i0"


def test_pause_resume_cancel_and_restart_move_the_record_and_its_images(service):
    record = SessionRecord(id="s2")
    job = admit(service, record)
    first = submitted(service, 1)
    assert on_loop(service, service.pause, job)
    assert record.status == PAUSED  # nothing was on a device: paused in the same message
    assert first.state == PARKED and not on_loop(service, service.pause, job)  # paused already: nothing to do
    assert on_loop(service, service.resume, job) and record.status == PENDING and first.state == QUEUED
    assert on_loop(service, service.cancel, job) and record.status == CANCELLED
    assert first.future.exception().code == "cancelled"
    assert not on_loop(service, service.cancel, job) and not on_loop(service, service.resume, job)

    old_run = job.run
    on_loop(service, service.restart, job)
    assert (record.status, record.attempt) == (PENDING, 2) and job.run is not old_run
    second = submitted(service, 2)
    service.pool.play(second)
    wait_for(lambda: record.status == COMPLETED)
    with pytest.raises(InvalidState, match="cannot restart in current status: completed"):
        on_loop(service, service.restart, job)


def test_a_replaced_run_reports_nothing(service):
    """A restart replaces the run; whatever the old one still says is not the record's any more."""
    record = SessionRecord(id="s3")
    job = admit(service, record)
    old = submitted(service, 1)
    on_loop(service, service.restart, job)  # the old run is cancelled; its image stops at its next boundary
    submitted(service, 2)
    on_loop(service, old.listener.task_started, old)  # a late event of the old run
    assert record.status == PENDING and record.attempt == 2


def test_images_starting_are_stored_on_the_device_in_one_write(service):
    records = [SessionRecord(id=f"m{i}") for i in range(3)]
    for record in records:
        admit(service, record)
    submitted(service, 3)
    tasks = list(service.pool.tasks)
    statements = []
    service.store._db.set_trace_callback(statements.append)
    service.mark_on_device(tasks)
    service.store._db.set_trace_callback(None)
    statements = [s for s in statements if s not in ("BEGIN", "COMMIT")]  # one transaction per write
    assert len(statements) == 1 and statements[0].startswith("UPDATE records")
    assert all(r.on_device for r in records)
    assert all(r.on_device for r in service.store.load_records())
    # the next start also unmarks the records whose images left since, in the same one statement
    statements.clear()
    service.store._db.set_trace_callback(statements.append)
    service.mark_on_device(tasks[2:], left={"m0", "m1", "m2"})  # m2 starts again: it stays marked
    service.store._db.set_trace_callback(None)
    statements = [s for s in statements if s not in ("BEGIN", "COMMIT")]
    assert len(statements) == 1
    assert {r.id: r.on_device for r in service.store.load_records()} == {"m0": False, "m1": False, "m2": True}
    assert [r.on_device for r in records] == [False, False, True]
    for task in tasks:
        service.pool.play(task)
    wait_for(lambda: all(r.status == COMPLETED for r in records))
    assert not any(r.on_device for r in records) and not any(r.on_device for r in service.store.load_records())


def test_cancel_all_cancels_every_unfinished_job_with_the_reason(service):
    records = [SessionRecord(id=f"c{i}") for i in range(2)]
    for record in records:
        admit(service, record)
    submitted(service, 2)
    on_loop(service, service.cancel_all, "the worker closed")
    assert [(r.status, r.error) for r in records] == [(CANCELLED, "the worker closed")] * 2
    assert RUNNING not in {r.status for r in records}


def controls_during_a_launch(service, record_id: str, *controls):
    """Holds a step's launch open (inside it, after its step is set, before its images exist) while another
    thread sends `controls` to the loop, as callers racing the launch would; returns once they were applied."""
    real_native_size, sent = service.native_size, []

    def launching(model_id):
        if not sent:
            sent.append(threading.Thread(target=lambda: [on_loop(service, control, service.job(record_id))
                                                         for control in controls]))
            sent[0].start()
            sent[0].join(0.5)  # it cannot be applied before this launch ends: it waits on the loop
            assert sent[0].is_alive()
        return real_native_size(model_id)

    service.native_size = launching
    return sent


def test_a_pause_and_resume_racing_a_launch_are_applied_after_it_in_order(service):
    """A pause and then a resume sent while a step launches: both are messages, applied after the launch, in
    order; the image ends queued under a pending run, never parked under it (a control storm in the Mono host
    once left a session pending for ever, its image parked under a resumed run)."""
    record = SessionRecord(id="race")
    sent = controls_during_a_launch(service, "race", service.pause, service.resume)
    admit(service, record)
    wait_for(lambda: sent and not sent[0].is_alive())
    (task,) = service.pool.tasks
    assert record.status == PENDING and task.state == QUEUED
    service.pool.play(task)
    wait_for(lambda: record.status == COMPLETED)


def test_a_run_paused_after_its_last_step_completes_when_resumed(service):
    """Paused once every step had ended, resumed: the run has nothing left to start and finishes at once; the
    record goes pending -> running -> completed and keeps its outputs (it stayed pending for ever, its outputs
    released, when the finish was refused from pending)."""
    record = SessionRecord(id="last")

    def pause_after_the_last_step(job):  # on the loop: a control arriving right after the last step
        if job.run.completed_steps == len(job.plan.steps):
            service.pause(job)

    service.on_progress = pause_after_the_last_step
    job = admit(service, record)
    service.pool.play(submitted(service, 1))
    wait_for(lambda: record.status == PAUSED)
    assert on_loop(service, service.resume, job)
    wait_for(lambda: record.status == COMPLETED)
    assert len(record.outputs) == 1 and service.outputs.get(record.outputs[0]["output_id"]).pixels[0, 0, 0] == 7


def test_a_cancel_during_a_launch_leaves_nothing_of_the_run_for_the_device(service):
    """A cancel sent while a step is being launched is applied right after the launch: every image the launch
    submitted is cancelled before the device takes any (the fake device plays only what is still queued), so
    no orphaned image runs ahead of live work (a restart storm once flooded the device with them)."""
    record = SessionRecord(id="gone")
    sent = controls_during_a_launch(service, "gone", service.cancel)
    job = admit(service, record)
    wait_for(lambda: sent and not sent[0].is_alive())
    assert record.status == CANCELLED
    assert job.run.all_tasks and all(t.state == DONE and t.future.exception().code == "cancelled"
                                     for t in job.run.all_tasks)
    service.native_size = lambda model_id: (32, 32)
    admit(service, SessionRecord(id="after"))
    queued = [t for t in service.pool.tasks if t.state == QUEUED]
    assert [t.record_id for t in queued] == ["after"]


def test_a_cancel_or_delete_before_the_run_begins_starts_no_run(service):
    """Between `admit` and `launch` the job has no run yet: a cancel (or a delete) there is final, and the launch
    then begins nothing."""
    cancelled, deleted = SessionRecord(id="early"), SessionRecord(id="dropped")

    def admit_cancel_delete_launch():
        jobs = [service.admit(cancelled, service.test_plan(1)), service.admit(deleted, service.test_plan(2))]
        assert service.cancel(jobs[0])
        service.delete("dropped", [jobs[1]], delete_files=True)
        service.launch(jobs)
        return jobs

    jobs = on_loop(service, admit_cancel_delete_launch)
    admit(service, SessionRecord(id="later"))
    submitted(service, 1)
    assert [t.record_id for t in service.pool.tasks] == ["later"]
    assert jobs[0].run is None and jobs[1].run is None and cancelled.status == CANCELLED


def test_a_restart_while_the_old_run_writes_its_outputs_keeps_exactly_the_new_attempts(service):
    """The old run has made its image and is writing it when a restart lands: the old run's outputs go, the new
    attempt runs to completion and keeps its own (a restart near the end lost every output: the old run completed
    the new attempt, the new run's completion was refused and released all of the owner's outputs)."""
    record = SessionRecord(id="late")
    job = admit(service, record)
    first = submitted(service, 1)
    real_add, restarted = service.outputs.add, []

    def restart_during_the_write(*args, **kwargs):
        buffer = real_add(*args, **kwargs)
        if not restarted:  # on the CPU pool, writing: a caller's restart comes now
            restarted.append(buffer.output_id)
            on_loop(service, service.restart, job)
        return buffer

    service.outputs.add = restart_during_the_write
    service.pool.play(first)
    second = submitted(service, 2)
    wait_for(lambda: job.run.ended or record.status != PENDING or second.state == QUEUED)
    assert record.attempt == 2 and record.status in (PENDING, RUNNING) and record.outputs == []
    service.pool.play(second)
    wait_for(lambda: record.status == COMPLETED)
    (output,) = record.outputs
    assert output["output_id"] != restarted[0] and service.outputs.get(output["output_id"]).pixels[0, 0, 0] == 7
    assert service.outputs.count() == 1  # the old attempt's image is not kept
    (stored,) = [r for r in service.store.load_records() if r.id == "late"]
    assert stored.status == COMPLETED and stored.outputs == record.outputs
