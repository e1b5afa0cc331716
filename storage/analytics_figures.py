"""The paper's figures from the store, through the DuckDB connection of
`storage.analytics`: `csr stats` (tables 7 and 10, figure 5 inputs, the
benchmark-by-version table) and the data of `csr report`."""

from __future__ import annotations

import json
from collections.abc import Sequence

import duckdb

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
_RESPONSE_LENGTH = """
WITH RECURSIVE
  nodes AS MATERIALIZED (
    SELECT iteration, prompt_id, node, parent_node, depth, is_final, words(text) AS words
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

# Responses the search cut at max_length, and default-set pairs that training
# would leave out (a response longer than its max_response_tokens). The pairs
# reach their two responses by equality joins on the leaf id, each side
# filtered to the iteration first (an IN over both ids would join every
# response with every pair).
_LENGTH_LIMITS = """
WITH truncated AS (
    SELECT iteration, count(*) FILTER (WHERE is_truncated) AS truncated_responses
    FROM responses {where}
    GROUP BY iteration
),
default_pairs AS (
    SELECT p.id, p.chosen_candidate_id, p.rejected_candidate_id
    FROM pairs AS p JOIN pair_sets AS s ON s.id = p.pair_set_id
    WHERE s.is_default {set_and_where}
),
pair_leaves AS (
    SELECT id AS pair_id, chosen_candidate_id AS leaf_id FROM default_pairs
    UNION ALL
    SELECT id, rejected_candidate_id FROM default_pairs
),
over_limit AS (
    SELECT r.iteration, count(DISTINCT l.pair_id) AS pairs_over_training_limit
    FROM pair_leaves AS l JOIN responses AS r ON r.leaf_candidate_id = l.leaf_id
    WHERE r.token_count > ? {response_and_where}
    GROUP BY r.iteration
)
SELECT t.iteration, t.truncated_responses, coalesce(o.pairs_over_training_limit, 0) AS pairs_over_training_limit
FROM truncated AS t LEFT JOIN over_limit AS o ON o.iteration = t.iteration
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
    `max_response_tokens` is the training limit whose over-long pairs are counted."""
    params: list = [] if iteration is None else [iteration]
    iterations = records(fetch(
        con,
        "SELECT number AS iteration, preset, state, policy_version FROM iterations "
        f"{_filter('number', iteration)} ORDER BY number",
        params,
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
    where = _filter("iteration", iteration)
    and_where = _filter("iteration", iteration, "AND")
    for row in records(fetch(con, _CANDIDATE_STATS.format(where=where), params)):
        by_number[row.pop("iteration")].update(row)
    for number, reason, n in fetch(con, _EXCLUSIONS.format(and_where=and_where), params).rows:
        by_number[number]["exclusions"][reason] = n
    for number, words in fetch(con, _RESPONSE_LENGTH.format(where=where), params).rows:
        by_number[number]["final_mean_words"] = words
    # Only the default pair sets (of the one iteration asked for) and their candidates.
    default_pairs = pair_responses_sql("WHERE s.is_default " + _filter("s.iteration", iteration, "AND"),
                                       _filter("iteration", iteration))
    for row in records(fetch(con, _PAIR_FIGURES.format(pair_responses=default_pairs), [*params, *params])):
        target = by_number[row.pop("iteration")]
        target["margin"] = {key.removeprefix("margin_"): row.pop(key) for key in MARGIN_FIELDS}
        target.update(row)
    limits = _LENGTH_LIMITS.format(where=where, set_and_where=_filter("s.iteration", iteration, "AND"),
                                   response_and_where=_filter("r.iteration", iteration, "AND"))
    for row in records(fetch(con, limits, [*params, *params, max_response_tokens, *params])):
        by_number[row.pop("iteration")].update(row)
    evaluations = records(fetch(con, _EVALUATIONS))
    for row in evaluations:
        for key in ("settings", "metrics"):
            row[key] = None if row[key] is None else json.loads(row[key])
    return _clean({"iterations": list(by_number.values()), "evaluations": evaluations,
                   "benchmarks": benchmark_table(evaluations)})


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
    return "" if iteration is None else f"{keyword} {column} = ?"


def _clean(value):
    if isinstance(value, dict):
        return {key: _clean(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_clean(item) for item in value]
    return clean_number(value)


# ---------------------------------------------------------------- report data

# A sample spread over iterations: rank pairs by a hash of the prompt within
# each iteration and take ranks round-robin, so the same prompts recur in
# every iteration (the same image before and after training).
_PAIR_SAMPLE = """
SELECT pr.*, pt.text AS prompt, pt.external_id, im.root AS image_root, im.rel_path AS image_rel_path,
       p.chosen_text, p.rejected_text
FROM ({pair_responses}) AS pr
JOIN pairs AS p ON p.id = pr.pair_id
JOIN prompts AS pt ON pt.id = pr.prompt_id
JOIN images AS im ON im.id = pt.image_id
WHERE pr.is_default
QUALIFY row_number() OVER (PARTITION BY pr.iteration ORDER BY hash(pr.prompt_id), pr.prompt_id) <= ?
ORDER BY row_number() OVER (PARTITION BY pr.iteration ORDER BY hash(pr.prompt_id), pr.prompt_id), pr.iteration
LIMIT ?
"""

# Only the trees of the leaves asked for are read into memory (the page shows
# a hundred leaves; the store holds millions of candidates).
_PATH_SENTENCES = """
WITH RECURSIVE
  leaves AS MATERIALIZED (
    SELECT DISTINCT iteration, prompt_id FROM candidates WHERE id IN (SELECT unnest(?::BIGINT[]))
  ),
  nodes AS MATERIALIZED (
    SELECT c.id, c.iteration, c.prompt_id, c.node, c.parent_node, c.depth, c.text, c.r_t, c.r_i, c.reward,
           c.cumulative_reward
    FROM candidates AS c SEMI JOIN leaves AS l ON l.iteration = c.iteration AND l.prompt_id = c.prompt_id
  ),
  path AS (
    SELECT id AS leaf_id, id AS candidate_id, iteration, prompt_id, parent_node, depth
    FROM nodes WHERE id IN (SELECT unnest(?::BIGINT[]))
    UNION ALL
    SELECT path.leaf_id, n.id, path.iteration, path.prompt_id, n.parent_node, n.depth
    FROM path JOIN nodes AS n
      ON n.iteration = path.iteration AND n.prompt_id = path.prompt_id
     AND n.node = path.parent_node AND n.depth < path.depth
  )
SELECT path.leaf_id, n.depth, n.text, n.r_t, n.r_i, n.reward, n.cumulative_reward
FROM path JOIN nodes AS n ON n.id = path.candidate_id
ORDER BY path.leaf_id, n.depth
"""


def pair_sample(con: duckdb.DuckDBPyConnection, limit: int) -> list[dict]:
    """Up to `limit` pairs of the default pair sets, spread over iterations."""
    if limit <= 0:
        return []
    sql = _PAIR_SAMPLE.format(pair_responses=pair_responses_sql("WHERE s.is_default"))
    return _clean(records(fetch(con, sql, [limit, limit])))


def path_sentences(con: duckdb.DuckDBPyConnection, leaf_ids: Sequence[int]) -> dict[int, list[dict]]:
    """leaf id -> its sentences from depth 0 down, each with R_T, R_I, R(s) and the running reward."""
    if not leaf_ids:
        return {}
    out: dict[int, list[dict]] = {int(leaf): [] for leaf in leaf_ids}
    ids = list(map(int, leaf_ids))
    for row in records(fetch(con, _PATH_SENTENCES, [ids, ids])):
        out[row.pop("leaf_id")].append(_clean(row))
    return out


def pair_distributions(con: duckdb.DuckDBPyConnection) -> list[dict]:
    """Per default pair: iteration, rewards, mean R_I / R_T and words of chosen and rejected (plots)."""
    return _clean(records(fetch(con, f"""
        SELECT iteration, chosen_reward, rejected_reward, chosen_mean_r_i, rejected_mean_r_i,
               chosen_mean_r_t, rejected_mean_r_t, chosen_words, rejected_words
        FROM ({pair_responses_sql("WHERE s.is_default")}) ORDER BY iteration, pair_id
    """)))
