"""The paper's figures from the store, through the DuckDB connection of
`storage.analytics`: `csr stats` (tables 7 and 10, figure 5 inputs, the
benchmark-by-version table) and the data of `csr report`."""

from __future__ import annotations

import json
from collections.abc import Sequence

import duckdb

from csr.storage import analytics_live as live
from csr.storage.analytics import clean_number, fetch, pair_responses_sql, records
from csr.storage.errors import StoreError

# ---------------------------------------------------------------- csr stats

_CANDIDATE_STATS = """
SELECT iteration,
       count(DISTINCT prompt_id) AS prompts,
       count(*) AS candidates,
       count(*) FILTER (WHERE is_final) AS final_responses,
       count(*) FILTER (WHERE exclusion_reason IS NOT NULL) AS excluded
FROM candidates {where}
GROUP BY iteration
"""

_EXCLUSIONS = """
SELECT iteration, exclusion_reason, count(*) AS n
FROM candidates
WHERE exclusion_reason IS NOT NULL {and_where}
GROUP BY iteration, exclusion_reason
ORDER BY iteration, n DESC, exclusion_reason
"""

# The `responses` recursion without the text: the word count is all this
# figure needs, and carrying the growing text costs a third of the time.
# A final candidate that was excluded never became a response: it is not
# counted (the same responses the `responses` table holds). Used only where
# that table does not cover the iteration's final candidates (stores written
# without responses rows); otherwise the figure comes from the responses.
_RESPONSE_LENGTH = """
WITH RECURSIVE
  nodes AS MATERIALIZED (
    SELECT iteration, prompt_id, node, parent_node, depth,
           is_final AND exclusion_reason IS NULL AS is_final, words(text) AS words
    FROM candidates {where}
  ),
  prefix AS (
    SELECT iteration, prompt_id, node, depth, is_final, words FROM nodes WHERE parent_node IS NULL
    UNION ALL
    SELECT n.iteration, n.prompt_id, n.node, n.depth, n.is_final, prefix.words + n.words
    FROM prefix
    JOIN nodes AS n
      ON n.iteration = prefix.iteration AND n.prompt_id = prefix.prompt_id
     AND n.parent_node = prefix.node AND n.depth > prefix.depth
  )
SELECT iteration, avg(words) AS final_mean_words
FROM prefix
WHERE is_final
GROUP BY iteration
"""

# Pair figures of each iteration's default pair set. A response's R_T and R_I
# are the means over its sentences (R(y) is a sum, but the sentence-level
# scores are what figure 5 plots); length counts words of the curated text.
_PAIR_FIGURES = """
SELECT iteration, pair_set, count(*) AS pairs,
       avg(chosen_reward) AS chosen_mean_reward,
       avg(rejected_reward) AS rejected_mean_reward,
       avg(chosen_mean_r_t) AS chosen_mean_r_t, avg(chosen_mean_r_i) AS chosen_mean_r_i,
       avg(rejected_mean_r_t) AS rejected_mean_r_t, avg(rejected_mean_r_i) AS rejected_mean_r_i,
       avg(chosen_words) AS chosen_mean_words,
       avg(rejected_words) AS rejected_mean_words,
       min(margin) AS margin_min,
       quantile_cont(margin, 0.25) AS margin_p25,
       quantile_cont(margin, 0.5) AS margin_median,
       quantile_cont(margin, 0.75) AS margin_p75,
       max(margin) AS margin_max
FROM ({pair_responses})
GROUP BY iteration, pair_set
"""

_EVALUATIONS = """
SELECT e.model_version, m.iteration AS trained_on_iteration, e.benchmark, e.n_responses,
       e.chair_s, e.chair_i, e.mean_words,
       CAST(e.settings AS VARCHAR) AS settings, CAST(e.metrics AS VARCHAR) AS metrics
FROM evaluations AS e LEFT JOIN model_versions AS m ON m.version = e.model_version
ORDER BY e.model_version, e.benchmark, e.id
"""

PAIR_FIELDS = (
    "pair_set", "pairs", "chosen_mean_reward", "rejected_mean_reward",
    "chosen_mean_r_t", "chosen_mean_r_i", "rejected_mean_r_t", "rejected_mean_r_i",
    "chosen_mean_words", "rejected_mean_words",
)
MARGIN_FIELDS = ("margin_min", "margin_p25", "margin_median", "margin_p75", "margin_max")


def stats(con: duckdb.DuckDBPyConnection, iteration: int | None = None, max_response_tokens: int = 1024) -> dict:
    """The paper's figures per iteration (tables 7 and 10, figure 5 inputs) and CHAIR per model.
    `max_response_tokens` is the training limit whose over-long pairs are counted.

    The counts, the responses and the pairs are read by the store itself,
    filtered to the iteration and through its indexes (storage/analytics_live.py):
    DuckDB receives per-iteration counts and one row per default-set pair."""
    iterations = records(fetch(
        con,
        "SELECT number AS iteration, preset, state, policy_version FROM iterations "
        f"{_filter('number', iteration)} ORDER BY number",
    ))
    if iteration is not None and not iterations:
        raise StoreError(f"the store has no iteration {iteration}")
    by_number = {row["iteration"]: row for row in iterations}
    for row in by_number.values():
        row.update(prompts=0, candidates=0, final_responses=0, excluded=0, exclusions={},
                   final_mean_words=None, **dict.fromkeys(PAIR_FIELDS),
                   margin={key.removeprefix("margin_"): None for key in MARGIN_FIELDS})
        row["pairs"] = 0
        row.update(truncated_responses=0, pairs_over_training_limit=0, max_response_tokens=max_response_tokens)
    counts = live.candidate_counts(con, iteration)
    responses = live.response_figures(con, iteration)
    walk = []  # iterations whose final candidates lack responses rows: their words come from the trees
    for number, row in counts.items():
        kept_finals = row["final_responses"] - row.pop("excluded_finals")
        by_number[number].update(row)
        figures = responses.get(number)
        if kept_finals and (figures is None or figures["responses"] != kept_finals):
            walk.append(number)
        elif figures is not None:
            by_number[number]["final_mean_words"] = figures["mean_words"]
    for number, figures in responses.items():
        by_number[number]["truncated_responses"] = figures["truncated_responses"]
    if walk:
        only = walk[0] if len(walk) == 1 else iteration
        for number, words in fetch(con, _RESPONSE_LENGTH.format(where=_filter("iteration", only))).rows:
            if number in walk:
                by_number[number]["final_mean_words"] = words
    for row in records(fetch(con, _PAIR_FIGURES.format(pair_responses=_pair_rows(con, iteration)))):
        target = by_number[row.pop("iteration")]
        target["margin"] = {key.removeprefix("margin_"): row.pop(key) for key in MARGIN_FIELDS}
        target.update(row)
    for number, n in live.pairs_over_limit(con, iteration, max_response_tokens).items():
        by_number[number]["pairs_over_training_limit"] = n
    evaluations = records(fetch(con, _EVALUATIONS))
    for row in evaluations:
        for key in ("settings", "metrics"):
            row[key] = None if row[key] is None else json.loads(row[key])
    return _clean({"iterations": list(by_number.values()), "evaluations": evaluations,
                   "benchmarks": benchmark_table(evaluations)})


def _pair_rows(con: duckdb.DuckDBPyConnection, iteration: int | None) -> str:
    """SQL of the default-set pairs (of one iteration) with their
    responses' figures: from the responses rows where every pair has both,
    else by walking the trees."""
    if live.pairs_without_responses(con, iteration) == 0:
        return live.pair_rows_sql(con, iteration)
    return pair_responses_sql("WHERE s.is_default " + _filter("s.iteration", iteration, "AND"),
                              _filter("iteration", iteration))


# The figures a benchmark-by-version table shows: (metric key path, label).
_HEADLINES = {
    "chair": [(("chair_s",), "CHAIR_S", ("ci", "chair_s")), (("chair_i",), "CHAIR_I", ("ci", "chair_i")),
              (("recall",), "recall", None), (("mean_words",), "words", None)],
    "pope": [((setting, name), f"{setting} {label}", (setting, "f1_ci") if name == "f1" else None)
             for setting in ("random", "popular", "adversarial")
             for name, label in (("f1", "F1"), ("accuracy", "accuracy"), ("yes_ratio", "yes-ratio"))],
}


def _dig(data, path):
    for key in path:
        if not isinstance(data, dict) or key not in data:
            return None
        data = data[key]
    return data


def benchmark_table(evaluations: list[dict]) -> list[dict]:
    """Benchmark-by-version rows: one per (benchmark, data set, metric), each
    with {version: value} and {version: [low, high]} where an interval is
    stored. The same benchmark and data set under other settings (another
    generation length, say) is a separate group, labelled by its order."""
    groups: dict[tuple, dict] = {}
    variants: dict[tuple, list[str]] = {}
    for row in evaluations:
        settings = row.get("settings") or {}
        metrics = row.get("metrics") or {k: row[k] for k in ("chair_s", "chair_i", "mean_words")}
        dataset = settings.get("dataset", "")
        signature = json.dumps(settings, sort_keys=True)
        seen = variants.setdefault((row["benchmark"], dataset), [])
        if signature not in seen:
            seen.append(signature)
        key = (row["benchmark"], dataset, seen.index(signature))
        groups.setdefault(key, {})[row["model_version"]] = metrics  # later rows win
    out = []
    for (benchmark, dataset, variant), by_version in groups.items():
        label = dataset if len(variants[(benchmark, dataset)]) == 1 else f"{dataset} #{variant + 1}"
        headlines = _HEADLINES.get(benchmark)
        if headlines is None and all("chair_s" in m for m in by_version.values()):
            headlines = _HEADLINES["chair"]  # CHAIR rows stored before 0004 under other names
        if headlines is None:  # recorded metrics: every number, as stored
            names = sorted({k for m in by_version.values() for k, v in m.items()
                            if isinstance(v, (int, float)) and not isinstance(v, bool)})
            headlines = [((name,), name, None) for name in names]
        for path, metric, ci_path in headlines:
            values = {v: _dig(m, path) for v, m in by_version.items()}
            if all(value is None for value in values.values()):
                continue
            out.append({"benchmark": benchmark, "dataset": label, "metric": metric,
                        "values": {v: x for v, x in sorted(values.items()) if x is not None},
                        "intervals": {v: _dig(m, ci_path) for v, m in sorted(by_version.items())
                                      if ci_path and _dig(m, ci_path) is not None}})
    return out


def _filter(column: str, iteration: int | None, keyword: str = "WHERE") -> str:
    # Inlined, not bound: binding any parameter makes DuckDB's Python client
    # import pandas and pyarrow (seconds and 100 MB for nothing here).
    return "" if iteration is None else f"{keyword} {column} = {int(iteration)}"


def _clean(value):
    if isinstance(value, dict):
        return {key: _clean(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_clean(item) for item in value]
    return clean_number(value)


# ---------------------------------------------------------------- report data

# The sample's pairs with their prompt and image. Only the pairs of the page
# are read (by id); their order is the order of the ids.
_PAIR_SAMPLE = """
SELECT pr.*, pt.text AS prompt, pt.external_id, im.root AS image_root, im.rel_path AS image_rel_path
FROM ({pair_rows}) AS pr
JOIN prompts AS pt ON pt.id = pr.prompt_id
JOIN images AS im ON im.id = pt.image_id
WHERE pr.pair_id IN ({ids})
ORDER BY list_position([{ids}], pr.pair_id)
"""
# The trees' walk when the store has no responses rows for the pairs: their texts from the pairs.
_WALKED_PAIR_ROWS = """
SELECT pr.*, p.chosen_text, p.rejected_text
FROM ({pair_responses}) AS pr JOIN pairs AS p ON p.id = pr.pair_id
"""


def pair_sample(con: duckdb.DuckDBPyConnection, limit: int) -> list[dict]:
    """Up to `limit` pairs of the default pair sets, spread over iterations
    (storage/analytics_live.py: sample_pair_ids)."""
    if limit <= 0:
        return []
    ids = live.sample_pair_ids(con, limit)
    if not ids:
        return []
    if live.pairs_without_responses(con, None) == 0:
        rows = live.pair_rows_sql(con, None, ids)
    else:
        rows = _WALKED_PAIR_ROWS.format(pair_responses=pair_responses_sql("WHERE s.is_default"))
    return _clean(records(fetch(con, _PAIR_SAMPLE.format(pair_rows=rows, ids=live.id_list(ids)))))


def path_sentences(con: duckdb.DuckDBPyConnection, leaf_ids: Sequence[int]) -> dict[int, list[dict]]:
    """leaf id -> its sentences from depth 0 down, each with R_T, R_I, R(s) and the running reward.

    Only the trees of these leaves are read (the page shows a hundred leaves;
    the store holds millions of candidates); the paths are walked here."""
    out: dict[int, list[dict]] = {int(leaf): [] for leaf in leaf_ids}
    if not out:
        return {}
    nodes = live.tree_nodes(con, out)
    by_id = {row[0]: row for row in nodes}
    by_node = {(row[3], row[4], row[1]): row for row in nodes}
    for leaf in out:
        row, path = by_id.get(leaf), []
        while row is not None:
            path.append(row)
            parent = by_node.get((row[3], row[4], row[2])) if row[2] is not None else None
            # A corrupt parent cycle must not walk forever: depths only go down.
            row = parent if parent is not None and parent[5] < row[5] else None
        out[leaf] = [_clean({"depth": r[5], "text": r[6], "r_t": r[7], "r_i": r[8], "reward": r[9],
                             "cumulative_reward": r[10]}) for r in reversed(path)]
    return out


def pair_distributions(con: duckdb.DuckDBPyConnection) -> list[dict]:
    """Per default pair: iteration, rewards, mean R_I / R_T and words of chosen and rejected (plots)."""
    rows = _pair_rows(con, None)
    return _clean(records(fetch(con, f"""
        SELECT iteration, chosen_reward, rejected_reward, chosen_mean_r_i, rejected_mean_r_i,
               chosen_mean_r_t, rejected_mean_r_t, chosen_words, rejected_words
        FROM ({rows}) ORDER BY iteration, pair_id
    """)))


def ri_histograms(con: duckdb.DuckDBPyConnection, bins: int = 20) -> list[dict]:
    """Figure 5's data: per iteration, the histogram of the default pairs'
    mean R_I, chosen and rejected over one range (the iteration's smallest to
    largest value of either; half a unit either side of a single value, in one
    bin), as matplotlib's hist bins them (the top value in the last bin).
    Counted by DuckDB: the report holds `bins` counts per iteration, not a row per pair."""
    rows = _pair_rows(con, None)
    out = []
    for number, low, high in fetch(con, f"""
        SELECT iteration, min(v), max(v) FROM (
            SELECT iteration, chosen_mean_r_i AS v FROM ({rows})
            UNION ALL SELECT iteration, rejected_mean_r_i FROM ({rows})) WHERE v IS NOT NULL
        GROUP BY iteration ORDER BY iteration""").rows:
        n = bins if low != high else 1
        if low == high:
            low, high = low - 0.5, high + 0.5
        counts = {"chosen": [0] * n, "rejected": [0] * n}
        for side in counts:
            for index, count in fetch(con, f"""
                SELECT least(CAST(floor(({side}_mean_r_i - {low!r}) / ({high!r} - {low!r}) * {n}) AS BIGINT), {n - 1}),
                       count(*)
                FROM ({rows}) WHERE iteration = {int(number)} AND {side}_mean_r_i IS NOT NULL GROUP BY 1""").rows:
                counts[side][index] += count
        out.append({"iteration": number, "edges": [low + (high - low) * k / n for k in range(n + 1)], **counts})
    return out
