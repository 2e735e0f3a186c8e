"""`make bench`: every benchmark, printed as tables and written to benchmarks/results/.

    python -m benchmarks.run            # everything
    python -m benchmarks.run --quick    # fewer rounds, for a smoke check
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from .coalescing_bench import coalescing_rows, sweep, write_plots
from .common import RESULTS, table, write_results
from .host_bench import host_rows
from .worker_bench import durability_rows, status_rows, throughput_against_pipeline, tiny_pipeline


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-host", action="store_true", help="skip the .NET host figures (no Mono here)")
    parser.add_argument("--model-cache", default=str(Path(tempfile.gettempdir()) / "embedded_worker_bench_models"))
    args = parser.parse_args(argv)
    rounds, seconds = (2, 1.0) if args.quick else (6, 3.0)
    loaded_status_samples: list[float] = []
    pipe = tiny_pipeline(args.model_cache)
    coalescing, coalescing_notes = coalescing_rows(args.model_cache, pipe, rounds)
    sweep_rows = sweep(args.model_cache, pipe)
    sections = {
        "Status call latency from Python (get_session_status)":
            status_rows(args.model_cache, seconds, loaded_status_samples),
        "Images/s: worker vs the diffusers pipeline's own call (tiny SD, 32 px, CPU)":
            throughput_against_pipeline(args.model_cache, rounds=rounds),
        "Eight concurrent single-image sessions: coalesced, one by one, raw batch 8": coalescing,
        "Images/s against N: N concurrent sessions (worker) and batch N (raw pipeline)": sweep_rows,
        "What durability costs: batches of 8 with state in memory or in SQLite with synced files":
            durability_rows(args.model_cache, rounds),
    }
    if not args.no_host:
        sections.update(host_rows())
    for title, rows in sections.items():
        print(table(title, rows))
    plots = write_plots(sweep_rows, [s * 1e6 for s in loaded_status_samples], RESULTS)
    notes = {"goal_status_p99_us_under_load": 1000, "goal_overhead_pct": 5, "goal_typed_status_p50_us_from_csharp": 10,
             "goal_board_read_us": 0.1, "goal_coalesced_vs_one_by_one": 1.8, "goal_coalesced_vs_raw_batch_pct": -5,
             "plots": plots, **coalescing_notes}
    json_path, md_path = write_results("bench", sections, notes)
    print(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
