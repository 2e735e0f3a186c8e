"""`make bench`: every benchmark, printed as tables and written to benchmarks/results/.

    python -m benchmarks.run            # everything
    python -m benchmarks.run --quick    # fewer rounds, for a smoke check
    python -m benchmarks.run --only status host   # these parts again; the rest kept from the last results
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from .admission_bench import ADMISSION_TITLE, admission_rows
from .checkpoint_bench import checkpoint_sections
from .cluster_bench import CLUSTER_TITLE, cluster_rows
from .coalescing_bench import coalescing_rows, sweep, write_plots
from .common import RESULTS, table, write_results
from .compiled_bench import compiled_rows
from .families_bench import COALESCING_TITLE, THROUGHPUT_TITLE, family_rows
from .host_bench import host_rows
from .lifecycle_bench import LIFECYCLE_TITLE, lifecycle_rows
from .preemption_bench import preemption_rows, write_timeline
from .prune_bench import PRUNE_TITLE, prune_rows
from .worker_bench import durability_rows, status_rows, throughput_against_pipeline, tiny_pipeline

PARTS = ("status", "throughput", "coalescing", "sweep", "preemption", "admission", "durability", "prune", "lifecycle",
         "host", "cluster", "families", "checkpoints", "compiled")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-host", action="store_true", help="skip the .NET host figures (no .NET runtime here)")
    parser.add_argument("--only", nargs="+", choices=PARTS, help="run these parts; keep the others' last results")
    parser.add_argument("--model-cache", default=str(Path(tempfile.gettempdir()) / "embedded_worker_bench_models"))
    args = parser.parse_args(argv)
    rounds, seconds = (2, 1.0) if args.quick else (6, 3.0)
    parts = set(args.only or PARTS) - ({"host"} if args.no_host else set())
    loaded_status_samples: list[float] = []
    pipe = tiny_pipeline(args.model_cache) if parts & {"coalescing", "sweep"} else None
    coalescing, coalescing_notes = coalescing_rows(args.model_cache, pipe, rounds) if "coalescing" in parts else ([], {})
    sweep_rows = sweep(args.model_cache, pipe) if "sweep" in parts else []
    sections = {}
    if "status" in parts:
        sections["Status call latency from Python (get_session_status)"] = \
            status_rows(args.model_cache, seconds, loaded_status_samples)
    if "throughput" in parts:
        sections["Images/s: worker vs the diffusers pipeline's own call (tiny SD, 32 px, CPU)"] = \
            throughput_against_pipeline(args.model_cache, rounds=rounds)
    if "coalescing" in parts:
        sections["Eight concurrent single-image sessions: coalesced, one by one, raw batch 8"] = coalescing
    if "sweep" in parts:
        sections["Images/s against N: N concurrent sessions (worker) and batch N (raw pipeline)"] = sweep_rows
    timelines, preemption_notes = {}, {}
    if "preemption" in parts:
        preemption, preemption_notes = preemption_rows(args.model_cache, rounds=max(1, rounds // 2))
        timelines = preemption_notes.pop("timelines")
        sections["Interactive during bulk: a 1-image session against a 48-item batch (tiny SD, 20 steps)"] = preemption
    if "admission" in parts:
        sections[ADMISSION_TITLE] = admission_rows(args.quick)
    if "durability" in parts:
        sections["What durability costs: batches of 8 with state in memory or in SQLite with synced files"] = \
            durability_rows(args.model_cache, rounds)
    if "prune" in parts:
        sections[PRUNE_TITLE] = prune_rows(args.model_cache, args.quick)
    lifecycle_notes = {}
    if "lifecycle" in parts:
        sections[LIFECYCLE_TITLE], lifecycle_notes = lifecycle_rows(args.model_cache, rounds)
    if "host" in parts:
        sections.update(host_rows())
    if "cluster" in parts:
        batch_rows, pixel_rows = cluster_rows(args.model_cache, max(2, rounds // 2))
        if batch_rows:  # Ray installed (pip install embedded_worker[cluster])
            sections[CLUSTER_TITLE] = batch_rows
            sections["Pixels back from a Ray actor, per image (one machine)"] = pixel_rows
    if "families" in parts:
        sections[THROUGHPUT_TITLE], sections[COALESCING_TITLE] = family_rows(args.model_cache, rounds)
    if "checkpoints" in parts:
        sections.update(checkpoint_sections(args.model_cache, rounds))
    compiled_notes = {}
    if "compiled" in parts:
        compiled_sections, compiled_notes = compiled_rows(args.model_cache, rounds)
        sections.update(compiled_sections)
    for title, rows in sections.items():
        print(table(title, rows))
    plots = write_plots(sweep_rows, [s * 1e6 for s in loaded_status_samples], RESULTS) if sweep_rows else []
    timeline = write_timeline(timelines, RESULTS)
    plots += [timeline] if timeline else []
    notes = {"goal_status_p99_us_under_load": 1000, "goal_overhead_pct": 5, "goal_typed_status_p50_us_from_csharp": 10,
             "goal_board_read_us": 0.1, "goal_coalesced_vs_one_by_one": 1.8, "goal_coalesced_vs_raw_batch_pct": -5,
             "goal_facade_status_p50_us": 3, "goal_service_shape_p50_us": 12, "goal_pollers_p99_us": 100,
             "goal_host_cold_start_ms": 2000, "goal_host_shutdown_ms": 1000,
             "plots": plots, **coalescing_notes, **preemption_notes, **lifecycle_notes, **compiled_notes,
             "goal_compiled_vs_pipeline_batch_8": 1.5, "goal_compiled_vs_pipeline_batch_1": 1.3,
             "goal_coalesced_vs_compiled_batch_8_pct": -5, "goal_cold_cache_first_image_vs_eager_pct": 10}
    if args.only:
        sections, notes = _with_last_results(sections, notes)
    json_path, md_path = write_results("bench", sections, notes)
    print(f"wrote {json_path} and {md_path}")
    return 0


def _with_last_results(sections: dict, notes: dict) -> tuple[dict, dict]:
    """The sections just measured, in the last results' order, beside the last results' other sections."""
    path = RESULTS / "bench.json"
    if not path.exists():
        return sections, notes
    last = json.loads(path.read_text())
    kept = [title for title in last["sections"] if title not in sections]
    merged = {title: sections.get(title, rows) for title, rows in last["sections"].items()}
    merged.update(sections)
    earlier = {k: v for k, v in last["notes"].items() if k not in notes or not notes[k]}
    before = last["notes"].get("kept_from_earlier_run")  # kept twice: still measured when it was first
    when = before["measured"] if isinstance(before, dict) and set(kept) <= set(before["sections"]) \
        else last["machine"].get("when")
    return merged, {**earlier, **{k: v for k, v in notes.items() if v or k not in earlier},
                    "kept_from_earlier_run": {"measured": when, "sections": kept}}


if __name__ == "__main__":
    raise SystemExit(main())
