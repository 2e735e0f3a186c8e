"""Past one machine: remote device workers on a real local Ray cluster (issue 10).

One head for the module (`ray start --head` on 127.0.0.1, 2 CPUs, no
dashboard, its own temp dir), stopped after, with every process it started.
The head-loss cases start their own heads, in a process of their own: Ray
ends a driver whose head it gave up on, and that must not be pytest.
"""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

from embedded_worker import ProcessingWorker, WorkerConfig, testing  # noqa: E402
from embedded_worker.cluster.local_head import LocalRayHead, _group_alive, free_port, ray_script  # noqa: E402
from embedded_worker.diffusion.denoise import ImageSpec  # noqa: E402
from embedded_worker.diffusion.device_worker_protocol import DeviceWorkerProtocol  # noqa: E402
from embedded_worker.errors import Cancelled, Unavailable  # noqa: E402

from .conftest import assert_same_up_to_batch_rounding, generate, run_of, session_status, wait_for  # noqa: E402
from .test_dotnet_host import HOST, host_build  # noqa: E402,F401  (the Mono build, shared)

SMALL = {"prompt": "a lighthouse at dusk", "steps": 4, "width": 32, "height": 32}


@pytest.fixture(scope="module")
def local_head():
    head = LocalRayHead(num_cpus=2)
    try:
        head.start(timeout=60)
        pgid = head.process.pid
        yield head
    finally:
        head.stop(timeout=40)  # SIGTERM to `ray start`, then its process group, SIGKILL after 40 s
    assert not _group_alive(pgid), "the Ray head left processes behind"


@pytest.fixture(scope="module")
def ray_head(local_head):
    return local_head.address


def on_cluster(make_worker, address, **cluster):
    """A worker on the cluster whose actors have all loaded the default model: an actor still loading
    takes no work, so a test that counts who took work must not start before (CI saw the local device
    run a whole batch while its actor was still importing diffusers)."""
    settings = {"address": address, "actors": 2, "cpus_per_actor": 1, "local_devices": False,
                "in_flight_per_actor": 2, **cluster}
    worker = make_worker(cluster=settings)
    for remote in remote_workers(worker):
        wait_for(lambda: remote.status()["loaded_models"], timeout=120)
    return worker


def remote_workers(worker):
    return [w for w in testing.device_workers(worker) if str(w.device).startswith("ray:")]


def run_batch(worker, batch_id, total, **parameters):
    return worker.execute_batch(batch_id=batch_id, workflow_id="img-generation-basic", background=False,
                                parameters={**SMALL, "seed": 500, "total_images": total, **parameters})


def by_seed(worker, reply):
    return {o["seed"]: worker.get_output(o["output_id"]) for o in reply["outputs"]}


def test_without_a_cluster_ray_is_never_imported(model_cache):
    script = textwrap.dedent(f"""
        import sys
        from embedded_worker import ProcessingWorker, WorkerConfig
        worker = ProcessingWorker(WorkerConfig.model_validate({{
            "model_cache_dir": {str(model_cache)!r}, "workflows_dir": None, "state_path": ":memory:",
            "default_model": "builtin:tiny-sd"}}))
        reply = worker.execute_workflow({{"workflow_id": "img-generation-basic", "background": False,
                                          "parameters": {{"prompt": "x", "steps": 2, "width": 32, "height": 32}}}})
        assert reply["status"] == "completed", reply
        assert worker.close(timeout=30)["success"]
        assert "ray" not in sys.modules, "ray was imported without a cluster"
        print("no ray")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "no ray" in done.stdout, done.stderr[-2000:]


@pytest.mark.parametrize("address", ["127.0.0.1:{port}", "ray://127.0.0.1:{port}"])
def test_a_bad_cluster_address_is_a_clear_error_at_start(model_cache, address):
    config = {"model_cache_dir": str(model_cache), "workflows_dir": None, "state_path": ":memory:",
              "default_model": "builtin:tiny-sd", "cluster": {"address": address.format(port=free_port())}}
    started = time.monotonic()
    with pytest.raises(Unavailable, match="no Ray cluster answers"):
        ProcessingWorker(WorkerConfig.model_validate(config))
    assert time.monotonic() - started < 15


def test_the_ray_command_is_the_venvs_whatever_the_interpreter_says(monkeypatch):
    """Inside the .NET host sys.prefix and sys.executable need not be the venv's: the package's place decides."""
    monkeypatch.setattr(sys, "prefix", "/nonexistent")
    monkeypatch.setenv("PATH", "")
    assert Path(ray_script()).parent == Path(ray.__file__).resolve().parents[4] / "bin"  # venv/lib/python3.X/...


def test_an_address_that_is_no_address_is_refused_by_the_config():
    with pytest.raises(ValueError, match="unknown cluster address"):
        WorkerConfig.model_validate({"cluster": {"address": "somewhere"}})
    assert WorkerConfig().cluster.address is None


def test_a_local_cluster_starts_with_the_worker_and_stops_with_it(make_worker):
    worker = make_worker(cluster={"address": "local", "actors": 1, "local_devices": False})
    head = testing.cluster(worker).head
    pgid = head.process.pid
    assert generate(worker, background=False, seed=3, **SMALL)["status"] == "completed"
    assert remote_workers(worker)[0].counters.images_done == 1
    assert isinstance(remote_workers(worker)[0], DeviceWorkerProtocol)  # the pool's one declared protocol
    assert worker.close(timeout=30)["success"]
    assert not _group_alive(pgid), "the private Ray head outlived the worker"


@pytest.mark.dotnet
def test_the_mono_host_runs_a_session_and_a_batch_through_the_cluster(host_build, model_cache, ray_head, tmp_path):
    """The .NET process is the Ray driver: it connects to the running head (the README's recommendation)."""
    cluster = {"address": ray_head, "actors": 2, "local_devices": False, "in_flight_per_actor": 4}
    environment = {**os.environ, "EMBEDDED_WORKER_VENV": str(host_build),
                   "EMBEDDED_WORKER_CONFIG": json.dumps({"model_cache_dir": str(model_cache),
                                                         "state_path": ":memory:", "cluster": cluster})}
    result = subprocess.run([str(HOST / "run.sh"), "--out", str(tmp_path)], env=environment, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "connected to the Ray cluster" in result.stdout and "ew-ray-1: actor" in result.stdout
    assert "session: completed" in result.stdout and "batch: 8 images" in result.stdout
    assert "demo passed: 10 PNG files" in result.stdout and "CHECK FAILED" not in result.stdout


def test_a_batch_runs_once_over_both_actors_with_the_local_pixels(make_worker, ray_head):
    worker = on_cluster(make_worker, ray_head)
    reply = run_batch(worker, "spread", 16)
    assert reply["status"] == "completed", reply.get("failed")
    assert sorted(o["seed"] for o in reply["outputs"]) == list(range(500, 516))  # every item exactly once
    done = [w.counters.images_done for w in remote_workers(worker)]
    assert sum(done) == 16 and all(done), done  # each actor took work
    remote = by_seed(worker, reply)
    status = worker.get_status()
    assert {d["device"] for d in status["device"]["devices"]} == {str(w.device) for w in remote_workers(worker)}

    local = make_worker()
    reference = by_seed(local, run_batch(local, "spread", 16))
    for seed, pixels in remote.items():
        assert pixels.flags["C_CONTIGUOUS"] and not pixels.flags["WRITEABLE"]
        assert_same_up_to_batch_rounding(pixels, reference[seed])


def test_local_devices_and_an_actor_share_one_queue(make_worker, ray_head):
    worker = on_cluster(make_worker, ray_head, actors=1, local_devices=True)
    reply = run_batch(worker, "shared", 16, steps=10)
    assert reply["status"] == "completed" and sorted(o["seed"] for o in reply["outputs"]) == list(range(500, 516))
    done = {w.name: w.counters.images_done for w in testing.device_workers(worker)}
    assert sum(done.values()) == 16 and len(done) == 2 and all(done.values()), done  # both took work
    devices = {d["device"] for d in worker.get_status()["device"]["devices"]}
    assert devices == {"cpu", "ray:ew-ray-0"}


def test_parallel_processing_spreads_a_batch_over_more_actors(make_worker, ray_head):
    worker = on_cluster(make_worker, ray_head, actors=1, cpus_per_actor=0.5)
    reply = worker.execute_batch(workflow_id="img-generation-basic", background=False,
                                 parameters={**SMALL, "seed": 700, "total_images": 12},
                                 configuration={"parallel_processing": True, "max_parallel_batches": 3,
                                                "max_batch_size": 2})
    assert reply["status"] == "completed" and reply["parallel"]["added"] == ["ew-ray-1", "ew-ray-2"]
    assert sorted(o["seed"] for o in reply["outputs"]) == list(range(700, 712))
    added = remote_workers(worker)[1:]
    wait_for(lambda: all(w.node_id is not None for w in added), timeout=120)  # each got its own actor
    assert len({w.actor_name for w in remote_workers(worker)}) == 3


def _kill_mid_batch(worker, kill, caplog, batch_id) -> None:
    """Start a batch, kill one actor (by `kill`) while it holds images, and check every item completes once."""
    victim = remote_workers(worker)[0]
    wait_for(lambda: victim.node_id is not None, timeout=120)  # a replacement first answers
    worker.execute_batch(batch_id=batch_id, workflow_id="img-generation-basic", background=True,
                         parameters={**SMALL, "steps": 20, "seed": 900, "total_images": 8})
    try:
        wait_for(lambda: victim.active_images > 0, timeout=60)
    except AssertionError:
        raise AssertionError(f"{victim.status()} / {worker.get_batch_status(batch_id=batch_id)}") from None
    dead_actor, deaths = victim.actor_name, victim.actor_deaths
    kill(victim)
    wait_for(lambda: worker.get_batch_status(batch_id=batch_id)["status"] == "completed", timeout=180,
             interval=0.05)
    final = worker.get_batch_status(batch_id=batch_id, include_items=True)
    assert (final["processed_items"], final["failed_items"]) == (8, 0)
    outputs = [o for item in final["items"] for o in item.get("outputs", [])] or final.get("outputs", [])
    seeds = sorted(o["seed"] for o in outputs)
    assert seeds == list(range(900, 908)), seeds  # each item exactly once, none lost, none twice
    assert victim.actor_deaths == deaths + 1 and victim.actor_name != dead_actor
    assert f"actor {dead_actor} (pid" in caplog.text and "died" in caplog.text  # the crash names the actor


def test_an_actor_killed_mid_batch_loses_no_image_and_is_replaced(make_worker, ray_head, caplog):
    worker = on_cluster(make_worker, ray_head)
    _kill_mid_batch(worker, lambda victim: ray.kill(victim.actor, no_restart=True), caplog, "killed")
    # and the actor's process itself, as a crashed node would lose it
    _kill_mid_batch(worker, lambda victim: os.kill(victim.actor_pid, signal.SIGKILL), caplog, "sigkilled")
    # the replacement takes new work
    victim = remote_workers(worker)[0]
    wait_for(lambda: victim.node_id is not None, timeout=120)
    before = victim.counters.images_done
    reply = run_batch(worker, "after", 8)
    assert reply["status"] == "completed"
    assert victim.counters.images_done > before


def test_pause_resume_and_cancel_reach_an_image_on_an_actor(make_worker, ray_head):
    worker = on_cluster(make_worker, ray_head, actors=1)
    local = make_worker()
    slow = {"prompt": "a slow one", "steps": 60, "width": 64, "height": 64}
    expected = local.get_output(generate(local, seed=31, background=False, **slow)["outputs"][0]["output_id"])

    generate(worker, session_id="held", seed=31, background=True, **slow)
    task = wait_for(lambda: run_of(worker, "held") and run_of(worker, "held").all_tasks
                    and run_of(worker, "held").all_tasks[0], timeout=120)
    wait_for(lambda: task.step >= 3, timeout=120)
    assert task.worker == "ew-ray-0"
    worker.control_session(session_id="held", action="pause")
    wait_for(lambda: session_status(worker, "held")["status"] == "paused", timeout=60)
    parked_at = task.resume_from.step  # the actor sent the paused image's state back to the head
    assert parked_at >= 3 and task.step == parked_at
    assert worker.control_session(session_id="held", action="resume")["status"] in ("pending", "running")
    wait_for(lambda: session_status(worker, "held")["status"] == "completed", timeout=120)
    assert task.resumed_from_step == parked_at  # it continued there: not one step computed again
    resumed = worker.get_output(session_status(worker, "held")["outputs"][0]["output_id"])
    assert_same_up_to_batch_rounding(resumed, expected)

    generate(worker, session_id="dropped", seed=32, background=True, **slow)
    task = wait_for(lambda: run_of(worker, "dropped") and run_of(worker, "dropped").all_tasks
                    and run_of(worker, "dropped").all_tasks[0], timeout=60)
    wait_for(lambda: task.step >= 3, timeout=120)
    assert worker.control_session(session_id="dropped", action="cancel")["status"] == "cancelled"
    wait_for(lambda: task.future.done(), timeout=60)
    assert task.step < 60 and session_status(worker, "dropped")["outputs"] == []


def test_a_suspending_close_brings_back_each_image_on_an_actor_at_the_step_it_reached(make_worker, ray_head,
                                                                                       tmp_path):
    """State is taken only at the close (every 1000 steps otherwise): unless the actor pauses its images and
    sends their states back, the head holds none and they start again from step 0 after the restart."""
    state = str(tmp_path / "state.sqlite3")
    worker = make_worker(state_path=state, checkpoints={"every_steps": 1000},
                         cluster={"address": ray_head, "actors": 1, "cpus_per_actor": 1, "local_devices": False})
    for remote in remote_workers(worker):
        wait_for(lambda: remote.status()["loaded_models"], timeout=120)
    slow = {"prompt": "a slow one", "steps": 60, "width": 64, "height": 64}
    generate(worker, session_id="suspended", seed=33, background=True, **slow)
    task = wait_for(lambda: run_of(worker, "suspended") and run_of(worker, "suspended").all_tasks
                    and run_of(worker, "suspended").all_tasks[0], timeout=120)
    wait_for(lambda: task.step >= 3, timeout=120)
    assert task.worker == "ew-ray-0" and task.resume_from is None  # no state on the head yet
    assert worker.close(timeout=60, pending="suspend")["threads_stopped"]
    stopped_at = task.resume_from.step  # the actor paused it and sent its state back
    assert 3 <= stopped_at < 60

    again = make_worker(state_path=state)  # this machine's device takes it
    status = wait_for(lambda: (s := session_status(again, "suspended"))["status"] == "completed" and s,
                      timeout=120)
    assert status["detailed_progress"]["resumed_from_step"] == stopped_at
    counted = testing.device_workers(again)[0].status()["checkpoints"]
    assert counted["steps_restored"] == stopped_at and counted["steps_recomputed_at_most"] == 0
    expected = again.get_output(generate(again, seed=33, background=False, **slow)["outputs"][0]["output_id"])
    assert_same_up_to_batch_rounding(again.get_output(status["outputs"][0]["output_id"]), expected)


def test_an_actor_forgets_cancels_whose_run_never_comes(model_cache, monkeypatch):
    """A cancel that finds no image is kept for the `run` it may have overtaken, but not for ever: the image may
    have finished before the cancel arrived, and then no `run` will ever ask for it."""
    from types import SimpleNamespace

    from embedded_worker.cluster import actor as actor_module

    clock = [1000.0]
    monkeypatch.setattr(actor_module, "time", SimpleNamespace(monotonic=lambda: clock[0]))
    actor = actor_module.DenoiseActor({"model_cache_dir": str(model_cache), "workflows_dir": None,
                                       "state_path": ":memory:", "default_model": "builtin:tiny-sd"}, "test-actor")
    try:
        actor.cancel("overtaken")
        actor.cancel("finished-before")
        clock[0] += actor_module.CANCEL_MEMORY_S / 2
        actor.cancel("recent")
        assert set(actor._cancelled) == {"overtaken", "finished-before", "recent"}
        clock[0] += actor_module.CANCEL_MEMORY_S / 2 + 1
        actor.cancel("latest")
        assert set(actor._cancelled) == {"recent", "latest"}
        spec = ImageSpec(model_id="builtin:tiny-sd", prompt="x", steps=2, width=32, height=32)
        with pytest.raises(Cancelled):  # the `run` a cancel overtook: cancelled on arrival, and forgotten
            actor.run("recent", spec, 5)
        assert set(actor._cancelled) == {"latest"}
    finally:
        assert actor.close()


def _is_loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip)
    mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:127.0.0.1, as a dual-stack socket shows it
    return address.is_loopback or (mapped is not None and mapped.is_loopback)


def test_every_ray_process_of_ours_talks_over_loopback_only(make_worker, local_head):
    """The head, its raylet and agents, the actors it starts and this driver: no listener and no connection on
    any address but loopback (Ray rewrites 127.0.0.1 to the machine's network address unless told not to)."""
    psutil = pytest.importorskip("psutil")
    worker = on_cluster(make_worker, local_head.address, actors=1)
    assert run_batch(worker, "loopback", 4)["status"] == "completed"
    head = psutil.Process(local_head.process.pid)
    ours = {os.getpid(), head.pid, remote_workers(worker)[0].actor_pid}
    ours |= {child.pid for child in head.children(recursive=True)}
    ours |= {p.pid for p in psutil.process_iter() if _process_group(p.pid) == head.pid}
    seen = [c for c in psutil.net_connections("inet") if c.pid in ours]
    assert any(c.status == psutil.CONN_LISTEN for c in seen) and len({c.pid for c in seen}) >= 3, seen
    outside = [(c.pid, c.status, c.laddr, c.raddr) for c in seen
               if not _is_loopback(c.laddr.ip) or (c.raddr and not _is_loopback(c.raddr.ip))]
    assert outside == [], outside


def _process_group(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None


def test_a_port_that_answers_but_is_no_ray_head_is_refused_and_leaves_nothing(model_cache):
    """Issue 23, item 13: `ray.init` against a port that accepts and never speaks retries for minutes on a thread
    nobody can stop. The start is refused in bounded time, with no connect thread and no connection left."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.1)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                accepted.append(server.accept()[0])
            except TimeoutError:
                continue

    acceptor = threading.Thread(target=accept, daemon=True)
    acceptor.start()
    config = {"model_cache_dir": str(model_cache), "workflows_dir": None, "state_path": ":memory:",
              "default_model": "builtin:tiny-sd",
              "cluster": {"address": f"127.0.0.1:{server.getsockname()[1]}", "connect_timeout_s": 3}}
    try:
        with pytest.raises(Unavailable):
            ProcessingWorker(WorkerConfig.model_validate(config))
        assert [t.name for t in threading.enumerate() if t.name.startswith("ew-ray")] == []
        assert accepted, "the start never tried the port"
        for connection in list(accepted):  # each one closed by its client: read to its end
            connection.settimeout(10)
            while connection.recv(4096):
                pass
        assert not ray.is_initialized()
    finally:
        stop.set()
        acceptor.join()
        for connection in accepted:
            connection.close()
        server.close()


def _head_loss_run(model_cache, *arguments, timeout: float = 560) -> dict:
    """tests/helpers/head_loss.py in a process of its own, told Ray's reconnect limit is 5 s: without our own
    watch, Ray ends that process 5 s after its head dies (exit 1, "Failed to connect to GCS within 5 seconds").
    Every head it started is stopped here, whatever happened to it."""
    environment = {**os.environ, "RAY_gcs_rpc_server_reconnect_timeout_s": "5"}
    child = subprocess.Popen([sys.executable, "-m", "tests.helpers.head_loss", str(model_cache), *arguments],
                             env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = child.communicate(timeout=timeout)
    finally:
        if child.poll() is None:
            child.kill()
            out, err = child.communicate()
        lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        for pgid in (line["head_pgid"] for line in lines if "head_pgid" in line):
            if _group_alive(pgid):
                os.killpg(pgid, signal.SIGKILL)
    assert child.returncode == 0 and lines and "head_pgid" not in lines[-1], (child.returncode, out[-3000:],
                                                                             err[-5000:])
    return lines[-1]


def test_a_lost_head_leaves_the_process_up_and_its_images_finish_here(model_cache):
    """Issue 23, item 3: the head is SIGKILLed (its whole process group) while images are out on its actor."""
    seen = _head_loss_run(model_cache, "local_devices")
    assert seen["out_on_actor_at_kill"] > 0
    assert seen["cut"] == {"status": "completed", "processed": 8, "failed": 0, "seeds": list(range(900, 908)),
                           "errors": []}  # every item exactly once
    before, after = seen["done_before_kill"], seen["done_after_cut"]
    assert after["ew-ray-0"] == before["ew-ray-0"] and sum(after.values()) == 8, (before, after)  # the rest here
    for cluster in (seen["cluster_after_cut"], seen["device_get_status"]):
        assert (cluster["state"], cluster["head_losses"]) == ("lost", 1), cluster
    assert seen["later"] == {"accepted": True, "status": "completed", "error_code": None}  # past Ray's limit
    assert seen["status_still_answers"]
    assert seen["back"]["status"] == "completed" and seen["back"]["seeds"] == list(range(950, 966))
    assert seen["actor_took_work_again"]
    assert (seen["cluster_at_end"]["state"], seen["cluster_at_end"]["reconnects"]) == ("connected", 1)
    assert seen["closed"]


def test_without_local_devices_a_lost_head_answers_unavailable_until_it_is_back(model_cache):
    seen = _head_loss_run(model_cache, "cluster_only")
    cut = seen["cut"]
    assert seen["out_on_actor_at_kill"] > 0 and cut["failed"] >= seen["out_on_actor_at_kill"]
    assert cut["processed"] + cut["failed"] == 8 and cut["errors"] == ["unavailable"], cut
    assert len(cut["seeds"]) == len(set(cut["seeds"])) == cut["processed"]  # none twice
    assert seen["cluster_after_cut"]["state"] == "lost"
    assert seen["later"]["error_code"] == "unavailable", seen["later"]  # refused, not left waiting
    assert seen["status_still_answers"]
    assert seen["back"]["status"] == "completed" and seen["back"]["seeds"] == list(range(950, 966))
    assert seen["actor_took_work_again"] and seen["cluster_at_end"]["state"] == "connected"
    assert seen["closed"]


@pytest.mark.soak
def test_a_private_head_killed_again_and_again_loses_no_image(model_cache):
    """`make soak`: the worker's own head ("local") SIGKILLed mid-batch 4 times; each time the watch finds it
    lost, the batch finishes here with every item once, and the worker starts the head again and uses it."""
    seen = _head_loss_run(model_cache, "private", "4", timeout=1200)  # 6.5 min on a busy 2-core machine
    for round, result in enumerate(seen["rounds"]):
        assert result["out_on_actor_at_kill"] > 0 and result["status"] == "completed", result
        assert result["seeds"] == list(range(1000 + 10 * round, 1008 + 10 * round)), result
    assert len(seen["rounds"]) == 4 and seen["back"]["status"] == "completed" and seen["actor_took_work_again"]
    cluster = seen["cluster_at_end"]
    assert (cluster["state"], cluster["head_losses"], cluster["reconnects"]) == ("connected", 4, 4), cluster
    assert seen["closed"]
