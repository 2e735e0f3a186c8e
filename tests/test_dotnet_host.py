"""The .NET host on both runtimes: the demo scenario end to end, the test suite inside it, the async checks,
the leak-then-shutdown host and the kill -9 host, each on Mono and on CoreCLR.

One build (Mono's `mcs`) runs on both: `run.sh --runtime mono|coreclr`. CoreCLR is the `dotnetcore2` runtime
`make setup` installs into the venv (or EMBEDDED_WORKER_DOTNET, or a `dotnet` on PATH). Marked `dotnet`.
`make test` installs Mono when missing and sets EMBEDDED_WORKER_REQUIRE_DOTNET, so there a missing runtime
fails instead of skipping.

The whole suite runs inside the host on Mono; on CoreCLR a representative part of it (SELFTEST_ON_CORECLR:
the board, output buffers, session control from threads, bad input, concurrency), to keep `make test` within
about 20 minutes on two cores.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from embedded_worker import ProcessingWorker, WorkerConfig

from .conftest import assert_same_up_to_batch_rounding, wait_for

pytestmark = pytest.mark.dotnet
HOST = Path(__file__).resolve().parents[1] / "dotnet_host_sample"
RUNTIMES = ("mono", "coreclr")
RUNTIME_NAMES = {"mono": "Mono", "coreclr": "CoreCLR"}
# What the self-test runs inside the host on CoreCLR: the parts that lean on the runtime (threads calling in,
# the board and output buffers read while the device runs, control from other threads, bad input, shutdown).
SELFTEST_ON_CORECLR = ("tests/test_progress_board.py", "tests/test_outputs_and_files.py",
                       "tests/test_session_control.py", "tests/test_bad_input.py", "tests/test_concurrency.py")


@pytest.fixture(scope="module")
def host_build():
    if not (shutil.which("mcs") and shutil.which("mono")):
        if os.environ.get("EMBEDDED_WORKER_REQUIRE_DOTNET"):
            pytest.fail("Mono (mcs, mono) is required here: apt-get install -y mono-devel")
        pytest.skip("Mono is not installed")
    venv = Path(sys.prefix)
    subprocess.run([str(HOST / "build.sh")], check=True, env={**os.environ, "EMBEDDED_WORKER_VENV": str(venv)},
                   capture_output=True, timeout=300)
    return venv


@pytest.fixture(scope="module", params=RUNTIMES)
def runtime(request, host_build) -> str:
    """Each host check once per runtime; a runtime that is missing fails where .NET is required."""
    probe = subprocess.run([str(HOST / "run.sh"), "--runtime", request.param, "--probe"], capture_output=True,
                           text=True, env={**os.environ, "EMBEDDED_WORKER_VENV": str(host_build)}, timeout=60)
    if probe.returncode != 0:
        why = f"{request.param} is not available: {probe.stderr.strip()}"
        if os.environ.get("EMBEDDED_WORKER_REQUIRE_DOTNET"):
            pytest.fail(why)
        pytest.skip(why)
    return request.param


def run_host(venv: Path, model_cache: Path, *arguments: str, timeout: float, runtime: str = "mono",
             state_path: str = ":memory:") -> subprocess.CompletedProcess:
    environment = {**os.environ, "EMBEDDED_WORKER_VENV": str(venv),
                   "EMBEDDED_WORKER_CONFIG": json.dumps({"model_cache_dir": str(model_cache),
                                                         "state_path": state_path})}
    return subprocess.run([str(HOST / "run.sh"), "--runtime", runtime, *arguments], env=environment,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def demo(host_build, runtime, model_cache, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"host_demo_{runtime}")
    result = run_host(host_build, model_cache, "--out", str(folder), "--summary", str(folder / "summary.json"),
                      runtime=runtime, timeout=600)
    return result, folder, runtime


def test_the_demo_exits_cleanly_and_says_what_it_did(demo):
    result, folder, runtime = demo
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"host runtime: {RUNTIME_NAMES[runtime]} (" in result.stdout.splitlines()[0]
    assert json.loads((folder / "summary.json").read_text())["dotnet_runtime"] == RUNTIME_NAMES[runtime]
    assert "demo passed: 10 PNG files" in result.stdout
    assert "batch: 8 images" in result.stdout and "pause at step" in result.stdout
    assert "[python INFO]" in result.stdout  # Python's log records reached the host
    assert "CHECK FAILED" not in result.stdout


def test_the_host_ran_the_documents_coordination_and_aggregated_its_status(demo):
    result, folder, _ = demo
    assert ("coordination: model.load_model -> inference.batch_process -> postprocessing.enhance, 3 images"
            in result.stdout), result.stdout[-3000:]
    coordination = json.loads((folder / "summary.json").read_text())["coordination"]
    assert (coordination["status"], coordination["seeds"]) == ("completed", [11, 12, 13])
    assert (coordination["model_state"], coordination["images_done"], coordination["enhance"]) == (
        "loaded", 3, "completed")
    assert coordination["domains"] == {d: "completed" for d in ("model", "inference", "postprocessing", "device")}


def test_the_host_wrote_decodable_pngs_of_the_right_size(demo):
    _, folder, _ = demo
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["checks_failed"] == 0 and len(summary["files"]) == 10
    assert summary["python_log_records"] > 0
    for entry in summary["files"]:
        image = Image.open(entry["path"])
        assert image.size == (entry["width"], entry["height"]) and image.mode == "RGB"


def test_the_host_pngs_hold_the_pixels_python_makes_with_the_same_seeds(demo, model_cache):
    _, folder, _ = demo
    files = json.loads((folder / "summary.json").read_text())["files"]
    written = {(f["stem"], f["seed"]): np.asarray(Image.open(f["path"])) for f in files}
    with ProcessingWorker(WorkerConfig(model_cache_dir=model_cache, state_path=":memory:")) as worker:
        session = worker.execute_workflow(workflow_id="img-generation-basic", background=False,
                                          parameters={"prompt": "a red circle on a blue background", "seed": 42, "steps": 60})
        assert np.array_equal(written[("session", 42)], worker.get_output(session["outputs"][0]["output_id"]))

        batch = worker.execute_batch(workflow_id="img-generation-basic", background=False, parameters={
            "prompt": "a red circle on a blue background", "seed": 100, "steps": 20, "total_images": 8})
        for output in batch["outputs"]:
            assert_same_up_to_batch_rounding(written[("batch", output["seed"])], worker.get_output(output["output_id"]))

        allocated = worker.allocate_input(32, 32)
        x = np.arange(32, dtype=np.uint8)
        allocated["buffer"][:, :, 0] = (x * 8)[None, :]
        allocated["buffer"][:, :, 1] = (x * 8)[:, None]
        allocated["buffer"][:, :, 2] = 128
        img2img = worker.execute_workflow(workflow_id="img2img-basic", background=False, parameters={
            "init_image": allocated["input_id"], "strength": 0.6, "steps": 20, "seed": 5})
        assert np.array_equal(written[("img2img", 5)], worker.get_output(img2img["outputs"][0]["output_id"]))


def test_the_test_suite_passes_inside_the_embedded_interpreter(host_build, runtime, model_cache):
    part = [] if runtime == "mono" else [str(HOST.parent / path) for path in SELFTEST_ON_CORECLR]
    result = run_host(host_build, model_cache, "--selftest", "-x", *part, runtime=runtime, timeout=1200)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "selftest: pytest inside the embedded interpreter exited with 0" in result.stdout
    assert " passed" in result.stdout


def test_the_host_refuses_to_start_without_a_virtual_environment(host_build, runtime, tmp_path):
    environment = {k: v for k, v in os.environ.items() if k != "EMBEDDED_WORKER_VENV"}
    launcher = subprocess.run([str(HOST / "run.sh"), "--runtime", runtime, "--probe"], capture_output=True,
                              text=True, check=True, env={**environment, "EMBEDDED_WORKER_VENV": str(host_build)})
    result = subprocess.run([launcher.stdout.strip(), str(HOST / "bin" / "EmbeddedWorkerHost.exe"),
                             "--venv", str(tmp_path / "none")],
                            env={**environment, "MONO_THREADS_SUSPEND": "preemptive",
                                 "DOTNET_SYSTEM_GLOBALIZATION_INVARIANT": "1"}, cwd=tmp_path,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "no Python virtual environment found" in result.stderr


def test_kill_nine_of_the_host_mid_batch_then_restart(host_build, runtime, model_cache, tmp_path):
    state = tmp_path / "state.sqlite3"
    environment = {**os.environ, "EMBEDDED_WORKER_VENV": str(host_build),
                   "EMBEDDED_WORKER_CONFIG": json.dumps({"model_cache_dir": str(model_cache),
                                                         "state_path": str(state)})}
    host = subprocess.Popen([str(HOST / "run.sh"), "--runtime", runtime, "--hold-batch", "host-crash", "--items", "10"],
                            env=environment, stdout=subprocess.PIPE, text=True, start_new_session=True)
    done_before = {}
    try:
        for line in host.stdout:
            if line.startswith("done "):
                _, item, output_id, seed = line.split()
                done_before[item] = (output_id, int(seed))
                if len(done_before) >= 3:
                    break
    finally:
        os.killpg(host.pid, 9)  # the whole host process, mid-batch (and never left behind)
        host.wait(timeout=30)
    assert len(done_before) >= 3
    with ProcessingWorker(WorkerConfig(model_cache_dir=model_cache, state_path=str(state))) as restarted:
        restarted.execute_batch(batch_id="host-crash", workflow_id="img-generation-basic")  # stored: runs once
        wait_for(lambda: restarted.get_batch_status(batch_id="host-crash")["status"] == "completed", timeout=300)
        final = restarted.get_batch_status(batch_id="host-crash")
        assert sorted(o["seed"] for o in final["outputs"]) == list(range(500, 510))
        by_item = {o["item_id"]: o["output_id"] for o in final["outputs"]}
        assert len(by_item) == 10
        for item, (output_id, _) in done_before.items():
            assert by_item[item] == output_id and restarted.get_output(output_id).shape == (64, 64, 3)  # builtin:shapes


def _leak_then_shutdown(venv: Path, model_cache: Path, runtime: str) -> None:
    result = run_host(venv, model_cache, "--leak-test", "4", runtime=runtime, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]  # -6 was the Mono GC abort
    assert "leak test: 4 threads leaked their objects, 0 failed" in result.stdout


@pytest.mark.parametrize("run", range(3))
def test_a_host_that_leaks_python_objects_from_several_threads_shuts_down_cleanly(host_build, runtime, model_cache,
                                                                                 run):
    _leak_then_shutdown(host_build, model_cache, runtime)


@pytest.mark.soak
@pytest.mark.parametrize("run", range(10))
def test_leak_then_shutdown_soak(host_build, runtime, model_cache, run):
    _leak_then_shutdown(host_build, model_cache, runtime)


def test_tokens_progress_from_the_board_and_typed_errors_from_csharp(host_build, runtime, model_cache):
    result = run_host(host_build, model_cache, "--check-async", runtime=runtime, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "async checks passed" in result.stdout and "CHECK FAILED" not in result.stdout


def test_the_service_lifetime_starts_off_the_callers_thread_and_stops_bounded(host_build, runtime, model_cache):
    """EmbeddedWorkerService as a host drives it: a cancelled start leaves nothing running (cancelled before, or
    during the start: its own process), a stop whose token fired returns while the shutdown goes on, a second stop
    waits for it."""
    result = run_host(host_build, model_cache, "--service-lifetime", runtime=runtime, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "service lifetime checks passed" in result.stdout and "CHECK FAILED" not in result.stdout
    assert "cancelled start: Canceled, worker none" in result.stdout
    facts = dict(re.findall(r"(\w+)=(\S+)", result.stdout.split("service lifetime: ", 1)[1].splitlines()[0]))
    assert facts["session"] == "completed" and facts["after_stop"] == "unavailable"
    assert {"start_returned_ms", "start_ms", "stop_with_fired_token_returned_ms", "stop_ms"} <= facts.keys()
    midway = run_host(host_build, model_cache, "--service-lifetime", "--cancel-during-start", runtime=runtime,
                      timeout=600)
    assert midway.returncode == 0, midway.stdout[-3000:] + midway.stderr[-3000:]
    assert "cancel during start: Canceled, worker none, shut down True, interpreter initialized False" in midway.stdout


def test_the_library_never_asks_pythonnet_for_a_buffer():
    """pythonnet 3.2.1's GetBuffer(... | PyBUF.FORMATS) aborts a CoreCLR process: buffers go through BufferLease."""
    for source in (HOST / "lib").rglob("*.cs"):
        code = re.sub(r"//.*", "", source.read_text()).replace("PythonApi.GetBuffer(", "")
        assert not re.search(r"\.GetBuffer\(|\bPyBUF\b|\bPyBuffer\b", code), source.name


BLOCKING_JSON = ['{"background": false}', '{"parameters": {"steps": 30},\n "background" :\tfalse}',
                 '{"type": "execute_workflow", "request_id": "r", "data": {"p": [1, {"b": null}], "background": false}}',
                 '{"backgr\\u006fund": false}', '{"background": true, "background": false}']
INLINE_JSON = ['{not json', '{"background": true}', '{}', '[]', 'null', '', '{"data": {"background": false}}',
               '{"type": 3, "data": {"background": false}}', '{"background": "false"}', '{"n": {"background": false}}',
               '{"background": false, "background": true}', '{"type": "t", "data": {"background": false}, "data": 1}']


def test_whether_a_json_request_blocks_is_read_in_csharp_as_pythons_json_reads_it(tmp_path):
    """ExecuteJsonAsync decides where a call runs without a Python round trip: the C# reader must agree with json."""
    if not (shutil.which("mcs") and shutil.which("mono")):
        if os.environ.get("EMBEDDED_WORKER_REQUIRE_DOTNET"):
            pytest.fail("Mono (mcs, mono) is required here: apt-get install -y mono-devel")
        pytest.skip("Mono is not installed")
    for text in BLOCKING_JSON + INLINE_JSON:  # the expectations are Python's own reading
        try:
            parsed = json.loads(text)
        except ValueError:
            parsed = None
        data = parsed.get("data") if isinstance(parsed, dict) and isinstance(parsed.get("type"), str) else None
        blocks = isinstance(parsed, dict) and (parsed.get("background") is False or (
            isinstance(data, dict) and data.get("background") is False))
        assert blocks == (text in BLOCKING_JSON), text
    cases = ", ".join(f"{json.dumps(text)}" for text in BLOCKING_JSON + INLINE_JSON)
    (tmp_path / "Check.cs").write_text(
        "namespace EmbeddedWorker { public static class Check { public static int Main() {\n"
        f"  string[] texts = {{ {cases} }};\n"
        "  foreach (var text in texts) System.Console.WriteLine(JsonRequestShape.Blocks(text) ? \"blocks\" : \"inline\");\n"
        "  return 0; } } }\n")
    subprocess.run(["mcs", "-langversion:7.2", "-nologo", f"-out:{tmp_path / 'check.exe'}", str(tmp_path / "Check.cs"),
                    str(HOST / "lib" / "Conversion" / "JsonRequestShape.cs")], check=True, timeout=120)
    answers = subprocess.run(["mono", str(tmp_path / "check.exe")], capture_output=True, text=True, check=True,
                             timeout=60).stdout.split()
    assert answers == ["blocks"] * len(BLOCKING_JSON) + ["inline"] * len(INLINE_JSON)
