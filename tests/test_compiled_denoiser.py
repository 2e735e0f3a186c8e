"""The compiled denoiser: off by default, built in the background, taken up between two steps, bounded graphs
under changing cohort sizes, pixels within the documented tolerance, and exact control on the compiled path.

Real compiles (AOTInductor in a child process) take a minute or two each on this machine, so the tests
that need one share a session-wide compile cache and use the fewest shapes: tiny SD at batch 1 (2 rows with
guidance) and tiny Flux at batch 1 (1 row). The storm of cohort sizes counts graphs with a stand-in build
(the eager forward behind the same buckets), so it costs no compile.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from embedded_worker import testing
from embedded_worker.diffusion.compiled_denoiser import PIXEL_TOLERANCE, _StepRunner, bucket_for, buckets
from embedded_worker.diffusion.families import ADAPTERS
from embedded_worker.diffusion.package_runners import LibraryRunner, LoaderRunner

from .conftest import device_worker, pipeline_of, run_of, session_status, wait_for

SD, FLUX = "builtin:tiny-sd", "builtin:tiny-flux"
FINAL = ("completed", "failed", "cancelled")


@pytest.fixture(scope="session")
def compile_cache(tmp_path_factory):
    """One compile cache for the whole test session: each shape is compiled once."""
    return tmp_path_factory.mktemp("compiled")


@pytest.fixture
def make_compiled_worker(make_worker, compile_cache):
    def make(**overrides):
        return make_worker(compile={"enabled": True, "cache_dir": str(compile_cache)}, **overrides)

    return make


def generate(worker, model: str, session_id: str | None = None, background: bool = False, **parameters) -> dict:
    params = {"prompt": "a red fox", "seed": 7, "steps": 4, "width": 32, "height": 32, "model": model,
              "guidance_scale": 3.5, **parameters}
    request = {"workflow_id": "img-generation-basic", "parameters": params, "background": background}
    if session_id is not None:
        request["session_id"] = session_id
    return worker.execute_workflow(request)


def pixels(worker, reply: dict) -> np.ndarray:
    assert reply["status"] == "completed", reply
    image = worker.get_output(reply["outputs"][0]["output_id"])
    assert image.std() > 1, "a flat image: broken weights would compare equal"
    return image


def warm(worker, model: str) -> None:
    """Run one image so the model's graph is asked for, then wait until it is built (or loaded from the cache)."""
    compiled = device_worker(worker).compiled
    generate(worker, model, seed=0)
    wait_for(lambda: compiled.graphs(model) or compiled.counters.failures, timeout=1200, interval=0.2)
    assert not compiled.counters.failures, compiled.counters.failures


def denoiser_status(worker) -> dict:
    """device.get_status's word on the first device worker's denoiser."""
    reply = worker.execute({"type": "device.get_status", "request_id": "r", "data": None})
    assert reply["success"], reply
    return reply["data"]["workers"][0]["denoiser"]


def test_off_by_default_the_device_runs_eager_and_says_so(worker):
    assert device_worker(worker).compiled is None  # (waits for the device side to start)
    reply = worker.execute({"type": "device.get_status", "request_id": "r", "data": None})
    denoisers = [d["denoiser"] for d in reply["data"]["workers"]]
    assert denoisers and all(d == {"path": "eager", "compile": "off"} for d in denoisers), reply


def test_rows_pad_to_a_bucket_and_come_back_cut_to_the_real_ones():
    assert buckets(16) == [1, 2, 4, 8, 16] and buckets(12) == [1, 2, 4, 8, 12]
    assert [bucket_for(rows, 12) for rows in (1, 3, 5, 9, 12)] == [1, 4, 8, 12, 12]
    seen = []

    def rowwise(sample, timestep, rows):  # what a denoiser does: every row on its own
        seen.append(sample.shape[0])
        return sample * 2 + timestep.view(-1, 1) + rows["text"].sum(1, keepdim=True)

    from embedded_worker.diffusion.compiled_denoiser import GraphKey

    key = GraphKey("m", 8, 8, (("sample", (4, 3), "float32"),), threads=2)
    sample, timestep, text = torch.randn(3, 3), torch.arange(3.0), torch.randn(3, 5)
    out = _StepRunner({key: rowwise}, [(key, 1)])(sample, timestep, {"text": text})
    assert seen == [4] and torch.equal(out, rowwise(sample, timestep, {"text": text}))


def test_a_forward_over_lanes_runs_its_rows_at_once_on_single_threaded_lanes():
    """Two lanes: the bucket of 4 rows is the 2-row, one-thread package twice, each half on a lane thread of its
    own whose OpenMP count is 1, the two running at the same time, while this thread keeps torch's count; a
    bucket of 1 row runs on one lane at two threads."""
    from embedded_worker.diffusion.compiled_denoiser import GraphKey
    from embedded_worker.diffusion.forward_lanes import ForwardLanes

    threads_here = torch.get_num_threads()
    lanes = ForwardLanes(2, "test")
    both_in = threading.Barrier(2)
    calls = []

    def rowwise(sample, timestep, rows):
        calls.append((threading.current_thread().name, sample.shape[0], torch.get_num_threads()))
        both_in.wait(30)  # breaks (and fails the test) unless the other half runs meanwhile
        return sample * 2 + timestep.view(-1, 1) + rows["text"].sum(1, keepdim=True)

    try:
        key = GraphKey("m", 8, 8, (("sample", (2, 3), "float32"),), threads=1)
        sample, timestep, text = torch.randn(3, 3), torch.arange(3.0), torch.randn(3, 5)
        out = _StepRunner({key: rowwise}, [(key, 2)], lanes)(sample, timestep, {"text": text})
        assert sorted(rows for _, rows, _ in calls) == [2, 2] and len({name for name, _, _ in calls}) == 2
        assert all(name.startswith("ew-lane-test") and threads == 1 for name, _, threads in calls), calls
        both_in = threading.Barrier(1)  # one lane from here: nothing to wait for
        alone = GraphKey("m", 8, 8, (("sample", (1, 3), "float32"),), threads=2)
        single = _StepRunner({alone: rowwise}, [(alone, 1)], lanes)(sample[:1], timestep[:1], {"text": text[:1]})
        assert calls[2][1:] == (1, 2) and torch.equal(single, out[:1])
    finally:
        lanes.close()
    assert torch.get_num_threads() == threads_here
    expected = sample * 2 + timestep.view(-1, 1) + text.sum(1, keepdim=True)
    assert out.shape == (3, 3) and torch.equal(out, expected)


def stand_in_build(worker, built: list):
    """A build that compiles nothing: the eager forward behind the same buckets, checking it is given the
    bucket's rows (so the padding is exercised) and counting what was asked for."""
    device = device_worker(worker)

    def build(job):
        built.append(job.key)
        pipe = device.call(lambda w: w.pipeline(job.key.model_id)[0]).result(timeout=60)
        adapter = ADAPTERS[job.family]
        from embedded_worker.diffusion.image_spec import ImageSpec

        spec = ImageSpec(job.key.model_id, "", height=job.key.height, width=job.key.width,
                         guidance_scale=job.guidance_scale)

        def run(sample, timestep, rows):
            assert sample.shape[0] == job.key.bucket
            return adapter.forward(pipe, sample, timestep, rows, spec)

        return run

    return build


def test_a_storm_of_cohort_sizes_builds_a_bounded_number_of_graphs(make_compiled_worker):
    worker = make_compiled_worker(scheduling={"max_batch_size": 8, "coalesce_wait_ms": 0})
    compiled = device_worker(worker).compiled
    built: list = []
    compiled.build = stand_in_build(worker, built)
    replies: list[dict] = []
    # batches of 1 to 3 images with 2 to 5 steps, arriving while others run: the cohort's size changes
    # nearly every step, between 1 and 8 images (2 to 16 rows with guidance)
    threads = [threading.Thread(target=lambda i=i: replies.append(worker.execute_batch(
        workflow_id="img-generation-basic", background=False, parameters={
            "prompt": f"storm {i}", "seed": i, "steps": 2 + i % 4, "width": 32, "height": 32, "model": SD,
            "total_images": 1 + i % 3}))) for i in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(600)
    assert len(replies) == 12 and all(r["status"] == "completed" for r in replies)
    wait_for(lambda: compiled.status()["queued"] == 0 and compiled.building is None)
    sizes = {key.bucket for key in compiled.graphs(SD)}
    assert len(built) == len(set(built)) == len(compiled.graphs(SD))  # each graph built once
    assert sizes <= set(buckets(16)), sizes  # 2 rows per image with guidance, 8 images at most
    assert len(sizes) <= len(buckets(16))
    status = denoiser_status(worker)
    assert status["graphs"] == len(sizes) and status["steps_compiled"] > 0


def test_the_compiled_forward_takes_over_between_two_steps_with_no_step_lost_or_repeated(make_compiled_worker,
                                                                                      make_worker):
    steps, handover = 8, 3
    worker = make_compiled_worker(scheduling={"max_batch_size": 1})
    device = device_worker(worker)
    compiled = device.compiled
    ready = threading.Event()
    compiled.before_ready.append(lambda key: ready.wait(1200))  # the build is done; its handover waits
    pipe = pipeline_of(worker, SD)
    eager_forwards = []
    hook = pipe.unet.register_forward_hook(lambda *args: eager_forwards.append(1))
    steps_seen = []

    def at_boundary(dev) -> None:
        steps_seen.append(1)
        if len(steps_seen) == handover:  # let the graph in while the device waits at this boundary
            ready.set()
            wait_for(lambda: compiled.graphs(SD) or compiled.counters.failures, timeout=1200, interval=0.2)

    remove = testing.on_step(worker, at_boundary)
    try:
        reply = generate(worker, SD, steps=steps, seed=3, scheduler="ddim")
    finally:
        remove()
        hook.remove()
    assert not compiled.counters.failures
    assert len(steps_seen) == steps  # DDIM: one forward a step, none lost, none repeated
    assert len(eager_forwards) == handover and compiled.counters.steps_eager == handover
    assert compiled.counters.steps_compiled == compiled.counters.forwards_compiled == steps - handover
    eager = make_worker()
    reference = pixels(eager, generate(eager, SD, steps=steps, seed=3, scheduler="ddim"))
    assert_within_tolerance(pixels(worker, reply), reference)
    status = denoiser_status(worker)
    assert status["path"] == "compiled" and status["graphs"] == 1 and status["compile_seconds"] >= 0
    # a lane per intra-op thread; one image with guidance is 2 rows: on two lanes or more, the 1-row package twice
    (key,) = compiled.graphs(SD)
    threads = torch.get_num_threads()
    assert status["lanes"] == (threads if threads > 1 else 1) and key.bucket == 2 // min(status["lanes"], 2)


def assert_within_tolerance(compiled: np.ndarray, eager: np.ndarray) -> int:
    difference = np.abs(compiled.astype(np.int16) - eager.astype(np.int16))
    assert difference.max() <= PIXEL_TOLERANCE, f"max difference {difference.max()} uint8 levels"
    return int(difference.max())


@pytest.mark.parametrize("model", [SD, FLUX])
def test_compiled_pixels_stay_within_the_tolerance_of_eager_over_many_seeds(make_compiled_worker, make_worker,
                                                                           model):
    eager_worker, worker = make_worker(), make_compiled_worker(scheduling={"max_batch_size": 1})
    warm(worker, model)
    compiled = device_worker(worker).compiled
    before = compiled.counters.steps_eager
    worst = max(assert_within_tolerance(pixels(worker, generate(worker, model, seed=seed)),
                                        pixels(eager_worker, generate(eager_worker, model, seed=seed)))
                for seed in range(12))
    assert compiled.counters.steps_eager == before and compiled.counters.steps_compiled >= 12 * 4
    print(f"{model}: compiled vs eager, worst of 12 seeds: {worst} uint8 levels")


def test_preempted_paused_and_resumed_on_the_compiled_path_is_exact(make_compiled_worker):
    """test_preemption's exact case, every step compiled: the denoiser's forward hooks do not fire in a
    compiled graph, so the device is held at step boundaries instead of inside a forward."""
    worker = make_compiled_worker(scheduling={"max_batch_size": 1, "coalesce_wait_ms": 0})
    warm(worker, SD)
    compiled = device_worker(worker).compiled
    eager_before, steps = compiled.counters.steps_eager, 6
    expected = pixels(worker, generate(worker, SD, session_id="solo", steps=steps, seed=5, scheduler="ddim"))
    reached = {3: threading.Event(), 5: threading.Event()}
    release = {3: threading.Event(), 5: threading.Event()}
    owners: list[set] = []

    def boundary(dev) -> None:
        owners.append({t.record_id for t in dev.active.tasks()})
        if len(owners) in reached:
            reached[len(owners)].set()
            release[len(owners)].wait(300)

    remove = testing.on_step(worker, boundary)
    try:
        generate(worker, SD, session_id="slow", background=True, steps=steps, seed=5, scheduler="ddim")
        assert reached[3].wait(300)
        worker.execute_workflow(session_id="urgent", workflow_id="img-generation-basic", priority=10,
                                background=True, parameters={"prompt": "a red fox", "seed": 9, "steps": steps,
                                                             "width": 32, "height": 32, "model": SD,
                                                             "guidance_scale": 3.5, "scheduler": "ddim"})
        wait_for(lambda: testing.pending_images(worker) == 1)
        release[3].set()
        assert reached[5].wait(300)  # the urgent session's second step: "slow" waits, preempted
        slow = run_of(worker, "slow").all_tasks[0]
        assert slow.state == "queued" and slow.parked is not None and slow.preemptions == 1
        held_at = slow.step
        assert worker.control_session(session_id="slow", action="pause")["status"] == "paused"
        release[5].set()
        wait_for(lambda: session_status(worker, "urgent")["status"] in FINAL)
        assert session_status(worker, "slow")["status"] == "paused" and slow.step == held_at
        assert worker.control_session(session_id="slow", action="resume")["success"]
        wait_for(lambda: session_status(worker, "slow")["status"] in FINAL)
    finally:
        remove()
    np.testing.assert_array_equal(pixels(worker, session_status(worker, "slow")), expected)
    assert sum(1 for held in owners if slow.record_id in held) == steps  # no step ran twice
    assert compiled.counters.steps_eager == eager_before  # every step of all three on the compiled path


def test_cancel_on_the_compiled_path_stops_within_one_step(make_compiled_worker):
    worker = make_compiled_worker(scheduling={"max_batch_size": 1})
    warm(worker, SD)
    compiled = device_worker(worker).compiled
    generate(worker, SD, session_id="doomed", steps=150, background=True)
    task = wait_for(lambda: (run := run_of(worker, "doomed")) and run.all_tasks and run.all_tasks[0])
    wait_for(lambda: task.step >= 2)
    assert worker.control_session(session_id="doomed", action="cancel")["status"] == "cancelled"
    at_cancel = compiled.counters.forwards_compiled
    wait_for(lambda: task.future.done())
    assert compiled.counters.forwards_compiled - at_cancel <= 1 and task.step < 150
    assert compiled.counters.steps_compiled >= 2


def test_pause_then_resume_on_the_compiled_path_gives_the_uninterrupted_pixels(make_compiled_worker):
    from .conftest import StepGate

    worker = make_compiled_worker(scheduling={"max_batch_size": 1})
    warm(worker, SD)
    compiled = device_worker(worker).compiled
    eager_before = compiled.counters.steps_eager
    expected = pixels(worker, generate(worker, SD, session_id="straight", steps=6))
    with StepGate(worker, forwards=3) as gate:
        generate(worker, SD, session_id="paused", background=True, steps=6)
        assert gate.pause("paused")["status"] == "paused"
    assert worker.control_session(session_id="paused", action="resume")["success"]
    wait_for(lambda: session_status(worker, "paused")["status"] in FINAL)
    np.testing.assert_array_equal(pixels(worker, session_status(worker, "paused")), expected)
    assert compiled.counters.steps_eager == eager_before


def test_a_restart_loads_the_compiled_graph_from_the_cache_instead_of_compiling(make_compiled_worker):
    first = make_compiled_worker()
    warm(first, SD)
    second = make_compiled_worker()
    warm(second, SD)
    counters = device_worker(second).compiled.counters
    assert counters.graphs_built == 0 and counters.graphs_loaded == 1


def test_a_compiled_forward_lets_other_threads_run_python_meanwhile(make_compiled_worker):
    """AOTInductor's own loader holds the GIL through a whole forward, so status calls and the host's polls
    would wait out every step; the worker calls the package's library, which lets it go. With a switch
    interval far longer than the test, another thread gets the GIL only when a forward lets it go: counted."""
    worker = make_compiled_worker()
    warm(worker, SD)
    compiled = device_worker(worker).compiled
    (key,) = compiled.graphs(SD)
    runner = compiled._runners[key]
    inputs = {name: torch.randn(shape) if dtype.startswith("float") else torch.full(shape, 500, dtype=getattr(
        torch, dtype)) for name, shape, dtype in key.inputs}
    sample, timestep = inputs.pop("sample"), inputs.pop("timestep")
    forwards, started, done = 10, threading.Event(), threading.Event()

    def run_forwards() -> None:
        started.set()
        for _ in range(forwards):
            runner(sample, timestep, inputs)
        done.set()

    interval = sys.getswitchinterval()
    sys.setswitchinterval(60.0)
    try:
        thread = threading.Thread(target=run_forwards)
        thread.start()
        started.wait()
        turns = 0
        while not done.wait(0.0005):
            turns += 1
        thread.join()
    finally:
        sys.setswitchinterval(interval)
    assert turns >= forwards, f"this thread ran {turns} times during {forwards} compiled forwards"
    assert isinstance(runner, LibraryRunner)
    (package,) = Path(compiled.cache_dir).glob(f"sd-{key.height}x{key.width}-rows{key.bucket}-*.pt2")
    loader = LoaderRunner(package, torch.device("cpu"))  # AOTInductor's own way in: the same output, bit for bit
    assert torch.equal(runner(sample, timestep, inputs), loader(sample, timestep, inputs))


@pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="Linux's idle scheduling class")
def test_the_compiler_child_runs_in_the_idle_scheduling_class(tmp_path):
    """The build's child process lowers itself to the idle class first thing, before its imports (so a cold cache
    costs the device's first steps little); seen from outside while it runs, here a build of a model folder that
    is not there. Only the interpreter's own start runs before it, in the usual class."""
    from embedded_worker.diffusion.compiled_denoiser import BuildJob, CompiledDenoisers, GraphKey

    compiled = CompiledDenoisers("idle", torch.device("cpu"), torch.float32, tmp_path, lanes=1)
    key = GraphKey("missing", 32, 32, (("sample", (1, 4, 4, 4), "float32"), ("timestep", (1,), "float32")), threads=1)
    job = BuildJob(key, tmp_path / "no-model", "sd", "cpu", "float32", tmp_path / "x.pt2", 3.5)
    errors, policies = [], []
    builder = threading.Thread(target=lambda: errors.append(pytest.raises(RuntimeError, compiled._build_in_child, job)))
    builder.start()
    while builder.is_alive():
        child = compiled._child
        try:
            policy = os.sched_getscheduler(child.pid) if child is not None else None
        except ProcessLookupError:
            continue
        if policy is not None and policy not in policies[-1:]:
            policies.append(policy)
        time.sleep(0.002)
    builder.join()
    compiled.close()
    assert errors and "exited with" in str(errors[0].value)  # it failed in the child, at the model's folder
    assert policies[-1] == os.SCHED_IDLE and policies.count(os.SCHED_IDLE) == 1, policies  # idle, and it stayed
