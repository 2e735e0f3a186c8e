"""The .NET host's figures: the host's --bench mode on each .NET runtime here (Mono, CoreCLR), side by side.

One build runs on both (`run.sh --runtime mono|coreclr`). The launcher is started directly (not through
run.sh's shell), so the cold start counts the runtime, Python and the worker, not the script.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from .common import RESULTS, median

HOST = Path(__file__).resolve().parents[1] / "dotnet_host_sample"
RUNTIMES = {"mono": "Mono", "coreclr": "CoreCLR"}


# The model every figure so far was measured on; named, so a change of the worker's default leaves them comparable.
BENCH_MODEL = "builtin:tiny-sd"


def host_rows() -> dict[str, list[dict]]:
    RESULTS.mkdir(parents=True, exist_ok=True)
    measured = {name: _measure(runtime) for runtime, name in RUNTIMES.items() if _launcher(runtime)}
    if not measured:
        raise RuntimeError("no .NET runtime for the host: install Mono (make host) or dotnetcore2 (make setup)")
    sections = {"The .NET host on each runtime: the service's figures against the goals": _side_by_side(measured)}
    for name, raw in measured.items():
        sections.update(_detail(name, raw))
    return sections


def _launcher(runtime: str) -> str | None:
    probe = subprocess.run([str(HOST / "run.sh"), "--runtime", runtime, "--probe"], capture_output=True, text=True,
                           env={**os.environ, "EMBEDDED_WORKER_VENV": sys.prefix})
    return probe.stdout.strip() if probe.returncode == 0 else None


def _measure(runtime: str) -> dict:
    path = RESULTS / f"host_raw_{runtime}.json"
    # the JSON-lines worker the host starts inherits this configuration: both run the same model
    model = os.environ.get("EMBEDDED_WORKER_BENCH_MODEL", BENCH_MODEL)
    config = {"state_path": ":memory:", "default_model": model}
    # the host imports this checkout's package, not the one the venv's editable install names (another worktree's)
    search_path = os.pathsep.join(p for p in (str(HOST.parent), os.environ.get("PYTHONPATH")) if p)
    environment = {**os.environ, "PYTHONPATH": search_path, "EMBEDDED_WORKER_VENV": sys.prefix,
                   "EMBEDDED_WORKER_CONFIG": json.dumps(config),
                   "EMBEDDED_WORKER_BENCH_MODEL": model, "MONO_THREADS_SUSPEND": "preemptive",
                   "DOTNET_SYSTEM_GLOBALIZATION_INVARIANT": "1"}
    started = time.perf_counter()
    finished = subprocess.run([_launcher(runtime), str(HOST / "bin" / "EmbeddedWorkerHost.exe"), "--bench", str(path)],
                              env=environment, timeout=1200, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if finished.returncode != 0:
        sys.stderr.write(f"the host benchmark on {runtime} exited with {finished.returncode}; its output ends:\n"
                         f"{finished.stdout[-2000:]}\n{finished.stderr[-4000:]}\n")
        raise RuntimeError(f"the .NET host benchmark failed on {runtime} (exit {finished.returncode})")
    raw = json.loads(path.read_text())
    shutdown = re.search(r"shutdown_ms=([0-9.]+)", finished.stdout)
    raw["cold_start"]["shutdown_ms"] = float(shutdown.group(1)) if shutdown else None
    raw["cold_start"]["process_wall_s"] = round(wall, 1)
    path.write_text(json.dumps(raw, indent=1))
    return raw


def _side_by_side(measured: dict[str, dict]) -> list[dict]:
    """One row per figure the issue sets a goal for, one column per runtime."""
    def figure(raw: dict, what: str) -> float | None:
        calls = [_row(r, "call") for r in raw["status_and_board"] if "call" in r]
        handoffs = [_row(r, "what") for r in raw["output_handoff"] if "what" in r]
        start = raw["cold_start"]
        shape = _find(calls, "ServiceProcessing shape (ExecuteAsync + dynamic)", "idle")
        typed = _find(calls, "typed GetSessionStatus", "idle")
        pollers = next(r for r in calls if r["call"].startswith("typed GetBatchStatus, 16 threads") and "1 ms" in r["call"])
        big = next(r for r in handoffs if r["path"] == "in-process buffer" and r["what"].startswith("8 x"))
        return {
            "cold start: runtime + Python + worker ready (ms)": start["cold_start_ms"],
            "  of which the .NET runtime to Main (ms)": start["runtime_start_ms"],
            "  of which Python up, venv on its path (ms)": start["python_start_ms"],
            "  of which the worker made (imports included) (ms)": start["worker_ms"],
            "model load, apart (ms)": start["model_load_ms"],
            "shutdown: PythonRuntime.Dispose (ms)": start["shutdown_ms"],
            "ServiceProcessing shape, idle p50 (us)": shape["p50_us"],
            "ServiceProcessing shape, idle p99 (us)": shape["p99_us"],
            "typed GetSessionStatus, idle p50 (us)": typed["p50_us"],
            "typed GetSessionStatus, idle p99 (us)": typed["p99_us"],
            "16 C# threads polling a running batch, p99 (us)": pollers["p99_us"],
            "6 MiB pixel hand-off (8 x 512x512x3 views), p50 (us)": big["p50_us"],
        }[what]

    goals = {"cold start: runtime + Python + worker ready (ms)": "< 2000",
             "shutdown: PythonRuntime.Dispose (ms)": "< 1000",
             "ServiceProcessing shape, idle p50 (us)": "<= 12",
             "16 C# threads polling a running batch, p99 (us)": "< 100"}
    whats = ["cold start: runtime + Python + worker ready (ms)", "  of which the .NET runtime to Main (ms)",
             "  of which Python up, venv on its path (ms)", "  of which the worker made (imports included) (ms)",
             "model load, apart (ms)", "shutdown: PythonRuntime.Dispose (ms)", "ServiceProcessing shape, idle p50 (us)",
             "ServiceProcessing shape, idle p99 (us)", "typed GetSessionStatus, idle p50 (us)",
             "typed GetSessionStatus, idle p99 (us)", "16 C# threads polling a running batch, p99 (us)",
             "6 MiB pixel hand-off (8 x 512x512x3 views), p50 (us)"]
    rows = []
    for what in whats:
        row = {"figure": what}
        for name, raw in measured.items():
            value = figure(raw, what)
            row[name] = round(value, 1) if isinstance(value, float) else value
        row["goal"] = goals.get(what, "")
        rows.append(row)
    rows.append({"figure": "runtime", **{name: raw["cold_start"]["runtime_version"] for name, raw in measured.items()},
                 "goal": ""})
    return rows


def _detail(name: str, measured: dict) -> dict[str, list[dict]]:
    calls = [_row(r, "call") for r in measured["status_and_board"] + measured["out_of_process"] if "call" in r]
    handoffs = [_row(r, "what") for r in measured["output_handoff"] + measured["out_of_process"] if "what" in r]
    typed = _find(calls, "typed GetSessionStatus", "idle")
    remote = _find(calls, "JSON-lines get_session_status", "idle")
    big = next(r for r in handoffs if r["path"] == "in-process buffer" and r["what"].startswith("8 x"))
    remote_big = next(r for r in handoffs if r["path"].startswith("out of process"))
    shape = _find(calls, "ServiceProcessing shape (ExecuteAsync + dynamic)", "idle")
    pollers = next(r for r in calls if r["call"].startswith("typed GetBatchStatus, 16 threads") and "1 ms" in r["call"])
    spinners = next(r for r in calls if r["call"].startswith("typed GetBatchStatus, 16 threads") and "spin" in r["call"])
    flow = measured["pollers_and_throughput"]
    quiet, polled = flow["img_s_without_pollers"], flow["img_s_with_pollers"]
    spun = flow["img_s_with_spinning_pollers"]
    ratios = [
        {"comparison": "status: out-of-process p50 / typed in-process p50",
         "ratio": round(remote["p50_us"] / typed["p50_us"], 1), "goal": ">= 10"},
        {"comparison": "ServiceProcessing shape idle p50 (us)", "ratio": round(shape["p50_us"], 1), "goal": "<= 12"},
        {"comparison": "status: out-of-process p50 / ServiceProcessing shape p50",
         "ratio": round(remote["p50_us"] / shape["p50_us"], 1), "goal": ">= 7"},
        {"comparison": "16 C# threads polling a running batch: p99 (us)", "ratio": round(pollers["p99_us"], 1),
         "goal": "< 100"},
        {"comparison": "16 C# threads spinning on status (no pause): p99 (us)", "ratio": round(spinners["p99_us"], 1),
         "goal": "< 100"},
        {"comparison": "batch img/s with 16 pollers (1 ms apart) / without (alternating 10 s windows)",
         "ratio": _ratio(median(polled), median(quiet)),
         "goal": "1.0 within noise", "without": [round(x, 2) for x in quiet], "with": [round(x, 2) for x in polled]},
        {"comparison": "batch img/s with 16 pollers spinning / without (2 cores: the spinners take them)",
         "ratio": _ratio(median(spun), median(quiet)), "goal": "(context)", "with": [round(x, 2) for x in spun]},
        {"comparison": "8x512x512x3 output: out-of-process / in-process handoff",
         "ratio": round(remote_big["p50_us"] / big["p50_us"]), "goal": ">= 1000"},
    ]
    return {
        f"From C# on {name}: calls and board reads (microseconds)": calls,
        f"From C# on {name}: output handoff (microseconds per whole result)": handoffs,
        f"From C# on {name}: in-process against the out-of-process JSON-lines worker": ratios,
    }


def _ratio(numerator: float, denominator: float) -> float | None:
    return round(numerator / denominator, 3) if denominator > 0 else None


def _row(raw: dict, label: str) -> dict:
    row = {label: raw[label], "condition": raw.get("condition", raw.get("path", ""))}
    if label == "what":
        row["path"] = raw["path"]
        del row["condition"]
    for key in ("n", "p50_us", "p99_us", "max_us"):
        value = raw.get(key)
        row[key] = round(value, 3) if isinstance(value, float) else value
    return row


def _find(rows: list[dict], call: str, condition: str) -> dict:
    return next(r for r in rows if r["call"] == call and r["condition"] == condition)
