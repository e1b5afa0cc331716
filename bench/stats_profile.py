"""Where the time of `csr stats` and `csr report` goes, step by step, on one store.

    python bench/stats_profile.py sqlite:////tmp/csr-bench-store/study-13000.db
    python bench/stats_profile.py postgresql+psycopg://postgres@127.0.0.1:5432/csr_bench_store_13000 --iter 3

Runs in one process: the analytics connection, then each store query of
`csr stats` (storage/analytics_live.py), then the steps of the report
(engine/io/report.py: its data, its four plots, its page's rows), printing
seconds per step and the peak RSS. The default pairs are read from the store
once ("the pairs") and kept in DuckDB; the later pair steps read that copy.
"""

from __future__ import annotations

import argparse
import resource
import time

from csr.engine.io import report
from csr.storage import analytics, analytics_figures, analytics_live


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("url")
    parser.add_argument("--iter", type=int, default=None)
    args = parser.parse_args()
    it = args.iter
    last = [time.perf_counter()]

    def step(name: str) -> None:
        now = time.perf_counter()
        print(f"{name:28s} {now - last[0]:7.2f} s", flush=True)
        last[0] = now

    with analytics.connect(args.url) as con:
        step("connect")
        analytics_live.candidate_counts(con, it)
        step("stats: candidate counts")
        analytics_live.response_figures(con, it)
        step("stats: response figures")
        analytics_live.pair_table(con, it)
        step("stats: the pairs (one pass)")
        analytics_live.pairs_without_responses(con, it)
        step("stats: pairs without responses")
        con.execute(analytics_figures._PAIR_FIGURES.format(pair_responses=analytics_live.pair_rows_sql(con, it))
                    ).fetchall()
        step("stats: pair figures")
        analytics_live.pairs_over_limit(con, it, 1024)
        step("stats: pairs over the limit")
        summary = analytics.stats(con, it)
        step("stats (whole)")
        histograms = analytics.ri_histograms(con)
        step("report: plot data")
        report.plot_ri_distribution(histograms)
        report.plot_reward_means(summary["iterations"])
        report.plot_lengths(summary["iterations"])
        report.plot_benchmarks(summary["benchmarks"])
        step("report: four plots")
        sample = analytics.pair_sample(con, 50)
        analytics.path_sentences(con, [p[k] for p in sample for k in ("chosen_candidate_id", "rejected_candidate_id")])
        step("report: page rows (50 pairs)")
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
