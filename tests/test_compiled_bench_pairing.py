"""The compiled bench's batch comparison: the compiled round runs right after the pipeline's, the table gives the
median of the per-round ratios, and the shapes model's batch of 8 runs twice the rounds.

The workers and the pipeline are stand-ins that record their calls and return scripted rates, so nothing is
timed and nothing is compiled.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from benchmarks import compiled_bench

ROUNDS = 3


class _Worker:
    def __init__(self, how: str):
        self.how = how

    def close(self, timeout: float) -> None:
        pass


@pytest.fixture
def recorded(monkeypatch):
    """The bench's collaborators replaced: each call is recorded as (what, model, batch) and gets a scripted rate
    (the pipeline's swing from round to round, the compiled worker 1.5x the pipeline round it follows, its
    forwards whole on the worker's threads half that)."""
    calls: list[tuple[str, str, int]] = []
    state = {"model": None, "pipeline_rate": 1.0}
    swing = iter([1.0, 4.0, 2.0, 8.0] * 100)  # a neighbour's load moving whole rounds

    def raw_pipeline_rate(pipe, batch, steps, rounds, **call):
        calls.append(("pipeline", state["model"], batch))
        state["pipeline_rate"] = next(swing)
        return [state["pipeline_rate"]]

    def worker_rate(worker, batch, steps, rounds, **parameters):
        calls.append((worker.how, parameters["model"], batch))
        return [{"compiled": 1.5, "one lane": 0.75}.get(worker.how, 1.0 / state["pipeline_rate"])
                * state["pipeline_rate"]]

    def folder(model_id):
        state["model"] = model_id
        return model_id

    status = {"graphs": 1, "lanes": 2, "graphs_built": 0, "compile_seconds": 0.0, "load_seconds": 0.0}
    monkeypatch.setattr(compiled_bench, "raw_pipeline_rate", raw_pipeline_rate)
    monkeypatch.setattr(compiled_bench, "worker_rate", worker_rate)
    monkeypatch.setattr(compiled_bench, "make_worker", lambda cache, compile_cache, lanes=None, **s: _Worker(
        "eager" if compile_cache is None else "one lane" if lanes == 1 else "compiled"))
    monkeypatch.setattr(compiled_bench, "warm", lambda worker, run: None)
    monkeypatch.setattr(compiled_bench, "coalesced", lambda worker, model_id, rounds: [])
    monkeypatch.setattr(compiled_bench, "ModelCatalog", lambda entries, cache: SimpleNamespace(folder=folder))
    monkeypatch.setattr(compiled_bench, "load_pipeline", lambda folder, device, dtype: "pipe")
    monkeypatch.setattr(compiled_bench.testing, "device_workers",
                        lambda worker: [SimpleNamespace(compiled=SimpleNamespace(status=lambda: status))])
    return calls


def _measured_rounds(calls, model_id, batch):
    """The (pipeline, compiled, one lane, eager) rounds of one row, after its two warm-up calls (the pipeline's
    and the eager worker's; the compiled workers' `warm` is a stand-in that calls nothing)."""
    row = [what for what, model, size in calls if (model, size) == (model_id, batch)][2:]
    return [tuple(row[i:i + 4]) for i in range(0, len(row), 4)]


def test_compiled_round_follows_the_pipeline_round_and_the_goal_row_runs_twice_the_rounds(recorded):
    rows, _, _ = compiled_bench.throughput_rows("cache", "compiled", ROUNDS)

    for row in rows:
        triples = _measured_rounds(recorded, row["model"], row["batch"])
        expected = 2 * ROUNDS if (row["model"], row["batch"]) == ("builtin:shapes", 8) else ROUNDS
        assert len(triples) == expected == row["rounds"]
        assert set(triples) == {("pipeline", "compiled", "one lane", "eager")}


def test_the_table_gives_the_median_of_each_rounds_ratio(recorded):
    rows, _, _ = compiled_bench.throughput_rows("cache", "compiled", ROUNDS)

    for row in rows:
        # each compiled round was scripted at 1.5x the pipeline round just before it, whatever the swing
        assert row["compiled_vs_pipeline_paired"] == 1.5
        assert row["spread_paired"] == "1.50-1.50"
        assert row["lanes_vs_one_lane_paired"] == 2.0 and row["lanes"] == 2
