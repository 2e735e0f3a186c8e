"""Shared pieces of the benchmarks: timing statistics, tables and the results files."""

from __future__ import annotations

import json
import platform
import statistics
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
REPOSITORY = Path(__file__).resolve().parent.parent


def repository_path(path: Path | str) -> str:
    """`path` as the results name it: relative to the repository, so a result file reads the same on every
    machine (it named plots from the machine's root)."""
    path = Path(path)
    if path.is_absolute() and path.resolve().is_relative_to(REPOSITORY):
        return path.resolve().relative_to(REPOSITORY).as_posix()
    parts = path.parts  # kept from a run on another machine: from its results folder on
    at = next((i for i in range(len(parts) - 1) if parts[i:i + 2] == ("benchmarks", "results")), None)
    return Path(*parts[at:]).as_posix() if at is not None else path.as_posix()


def percentiles(samples_seconds: list[float]) -> dict:
    """p50, p99 and max in microseconds."""
    ordered = sorted(samples_seconds)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1e6  # noqa: E731
    return {"n": len(ordered), "p50_us": round(pick(0.50), 2), "p99_us": round(pick(0.99), 2),
            "max_us": round(ordered[-1] * 1e6, 2)}


def median(values: list[float]) -> float:
    return statistics.median(values)


def machine() -> dict:
    import torch

    return {"python": platform.python_version(), "torch": torch.__version__, "cpu_threads": torch.get_num_threads(),
            "processor": platform.processor() or platform.machine(), "when": time.strftime("%Y-%m-%d %H:%M:%S")}


def table(title: str, rows: list[dict]) -> str:
    """A markdown table of `rows` (all with the same keys)."""
    if not rows:
        return f"### {title}\n\n(no rows)\n"
    keys = list(rows[0])
    lines = [f"### {title}", "", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row[k]) for k in keys) + " |")
    return "\n".join(lines) + "\n"


def _cell(value) -> str:
    return f"{value:,.2f}" if isinstance(value, float) else str(value)


def write_results(name: str, sections: dict[str, list[dict]], notes: dict) -> tuple[Path, Path]:
    RESULTS.mkdir(parents=True, exist_ok=True)
    json_path = RESULTS / f"{name}.json"
    md_path = RESULTS / f"{name}.md"
    if notes.get("plots"):
        notes = {**notes, "plots": [repository_path(plot) for plot in notes["plots"]]}
    json_path.write_text(json.dumps({"machine": machine(), "notes": notes, "sections": sections}, indent=2))
    body = [f"# {name}", "", f"machine: {json.dumps(machine())}", ""]
    body += [table(title, rows) for title, rows in sections.items()]
    body += ["", *[f"- {k}: {v}" for k, v in notes.items()]]
    kept = RESULTS / f"{name}_notes.md"  # hand-written context (before -> after tables) that a rerun keeps
    if kept.exists():
        body += ["", kept.read_text().rstrip()]
    md_path.write_text("\n".join(body) + "\n")
    return json_path, md_path
