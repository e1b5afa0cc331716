"""`csr stats`: the paper's figures per iteration, recomputed by hand from the synthetic study."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from tests.analytics_fixtures import FilledStore as Store
from tests.analytics_fixtures import (
    Study,
    assert_close,
    one_line_error,
    sqlite_store,
)
from tests.cli_runner import invoke_csr

# ---------------------------------------------------------------- csr stats


def quantile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (DuckDB quantile_cont)."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * q
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def expected_stats(study: Study, number: int) -> dict:
    trees = [t for t in study.trees if t.iteration == number]
    rows = [row for t in trees for row in t.rows]
    finals = [(t, row) for t in trees for row in t.finals()]
    pairs = [p for p in study.pairs if p.iteration == number and p.is_default]
    exclusions: dict[str, int] = {}
    for row in rows:
        if row["exclusion_reason"]:
            exclusions[row["exclusion_reason"]] = exclusions.get(row["exclusion_reason"], 0) + 1
    margins = [p.margin for p in pairs]
    return {
        "iteration": number,
        "prompts": len(trees),
        "candidates": len(rows),
        "final_responses": len(finals),
        "excluded": sum(exclusions.values()),
        "exclusions": exclusions,
        "final_mean_words": statistics.fmean(len(t.text(r["node"]).split()) for t, r in finals),
        "pair_set": "default",
        "pairs": len(pairs),
        "chosen_mean_reward": statistics.fmean(p.chosen["cumulative_reward"] for p in pairs),
        "rejected_mean_reward": statistics.fmean(p.rejected["cumulative_reward"] for p in pairs),
        "chosen_mean_r_t": statistics.fmean(statistics.fmean(s["r_t"] for s in p.chosen_node_path) for p in pairs),
        "chosen_mean_r_i": statistics.fmean(statistics.fmean(s["r_i"] for s in p.chosen_node_path) for p in pairs),
        "rejected_mean_r_t": statistics.fmean(statistics.fmean(s["r_t"] for s in p.rejected_node_path) for p in pairs),
        "rejected_mean_r_i": statistics.fmean(statistics.fmean(s["r_i"] for s in p.rejected_node_path) for p in pairs),
        "chosen_mean_words": statistics.fmean(len(p.chosen_text.split()) for p in pairs),
        "rejected_mean_words": statistics.fmean(len(p.rejected_text.split()) for p in pairs),
        "margin": {"min": min(margins), "p25": quantile(margins, 0.25), "median": quantile(margins, 0.5),
                   "p75": quantile(margins, 0.75), "max": max(margins)},
    }


def test_stats_match_hand_computation(store: Store):
    result = invoke_csr("--db", store.url, "stats", "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert [it["iteration"] for it in summary["iterations"]] == [1, 2]
    for it in summary["iterations"]:
        assert_close(it, expected_stats(store.study, it["iteration"]), f"iter{it['iteration']}")
    evaluations = [{k: e[k] for k in ("model_version", "benchmark", "n_responses", "chair_s", "chair_i", "mean_words")}
                   for e in summary["evaluations"]]
    assert evaluations == store.study.evaluations


def test_stats_one_iteration_and_table(sqlite_study: Store):
    result = invoke_csr("--db", sqlite_study.url, "stats", "--iter", "2", "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert [it["iteration"] for it in summary["iterations"]] == [2]
    assert_close(summary["iterations"][0], expected_stats(sqlite_study.study, 2))

    table = invoke_csr("--db", sqlite_study.url, "stats")
    assert table.returncode == 0, table.stderr
    for label in ("chosen mean reward", "rejected mean R_I", "margin median", "CHAIR_S", "excluded: "):
        assert label in table.stdout

    assert "no iteration 9" in one_line_error(invoke_csr("--db", sqlite_study.url, "stats", "--iter", "9"))


def test_stats_of_an_empty_store(tmp_path: Path):
    url, engine = sqlite_store(tmp_path)
    engine.dispose()
    result = invoke_csr("--db", url, "stats", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"iterations": [], "evaluations": [], "benchmarks": []}
