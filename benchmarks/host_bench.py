"""The .NET host's figures: it runs the Mono build's --bench mode and reads what it measured."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from .common import RESULTS, median

HOST = Path(__file__).resolve().parents[1] / "dotnet_host_sample"


# The model every figure so far was measured on; named, so a change of the worker's default leaves them comparable.
BENCH_MODEL = "builtin:tiny-sd"


def host_rows() -> dict[str, list[dict]]:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "host_raw.json"
    # the JSON-lines worker the host starts inherits this configuration: both run the same model
    config = {"state_path": ":memory:", "default_model": os.environ.get("EMBEDDED_WORKER_BENCH_MODEL", BENCH_MODEL)}
    environment = {**os.environ, "EMBEDDED_WORKER_VENV": sys.prefix, "EMBEDDED_WORKER_CONFIG": json.dumps(config)}
    finished = subprocess.run([str(HOST / "run.sh"), "--bench", str(path)], env=environment, timeout=1200,
                              capture_output=True, text=True)
    if finished.returncode != 0:
        sys.stderr.write(f"the host benchmark exited with {finished.returncode}; its output ends:\n"
                         f"{finished.stdout[-2000:]}\n{finished.stderr[-4000:]}\n")
        raise RuntimeError(f"the .NET host benchmark failed (exit {finished.returncode})")
    measured = json.loads(path.read_text())
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
        "From C# on Mono: calls and board reads (microseconds)": calls,
        "From C#: output handoff (microseconds per whole result)": handoffs,
        "From C#: in-process against the out-of-process JSON-lines worker": ratios,
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
