"""Queries the store runs itself, for `csr stats` and `csr report`.

DuckDB's scanners do not push a WHERE clause, a join or an aggregate into
the store: a query over the `candidates` view reads every candidate row of
the store (millions at a study's size, each with its token ids) through the
scanner, whatever it filters. Here the store's own SQL engine does the
filtering, the index lookups and the aggregates (through `sqlite_query` /
`postgres_query`), and DuckDB receives only the result rows: per-iteration
counts, or one row per pair. The SQL is the common subset of SQLite and
PostgreSQL; booleans are read with CASE (integers in SQLite).

Where the store holds a `responses` row for every leaf a figure needs (every
store csr writes does, revision 0003 rebuilt them for older ones), a pair's
sentence-level means come from the response's sums; otherwise the caller
falls back to walking the candidate trees in DuckDB.
"""

from __future__ import annotations

from collections.abc import Iterable

import duckdb

ALIAS = "store"


def _literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _is_sqlite(con: duckdb.DuckDBPyConnection) -> bool:
    # No bound parameter: binding one makes DuckDB's client import pandas and pyarrow.
    (kind,) = con.execute(f"SELECT type FROM duckdb_databases() WHERE database_name = {_literal(ALIAS)}").fetchone()
    return kind == "sqlite"


def live(con: duckdb.DuckDBPyConnection, sql: str) -> str:
    """A table function that runs `sql` in the attached store (for a FROM clause).

    `sqlite_query` types every column VARCHAR (SQLite's text of a REAL keeps 15
    digits: read floats through `real`); callers cast."""
    function = "sqlite_query" if _is_sqlite(con) else "postgres_query"
    return f"{function}({_literal(ALIAS)}, {_literal(sql)})"


def real(con: duckdb.DuckDBPyConnection, expression: str, name: str) -> str:
    """A float column of store SQL that reaches DuckDB exactly (17 significant digits from SQLite: the "!" flag makes them exact)."""
    if _is_sqlite(con):
        return f"CASE WHEN {expression} IS NULL THEN NULL ELSE printf('%!.17g', {expression}) END AS {name}"
    return f"{expression} AS {name}"


def where(column: str, iteration: int | None, keyword: str = "WHERE") -> str:
    """An iteration filter inlined into store SQL (the scanners' query functions take no parameters)."""
    return "" if iteration is None else f"{keyword} {column} = {int(iteration)}"


def id_list(ids: Iterable[int]) -> str:
    return ", ".join(str(int(i)) for i in ids) or "NULL"


def _flag(column: str) -> str:
    return f"CASE WHEN {column} THEN 1 ELSE 0 END"


# ------------------------------------------------------------ candidates

def candidate_counts(con: duckdb.DuckDBPyConnection, iteration: int | None) -> dict[int, dict]:
    """iteration -> prompts, candidates, final_responses, excluded, exclusions, kept_finals.

    Each count is its own statement so that each reads an index of its own
    (SQLite: the covering ix_candidates_final and ix_candidates_children,
    and ix_candidates_excluded holding only the excluded candidates)."""
    out: dict[int, dict] = {}
    for number, candidates, finals in con.execute(
        "SELECT CAST(iteration AS INTEGER), CAST(n AS BIGINT), CAST(f AS BIGINT) FROM " + live(con, (
            f"SELECT iteration, count(*) AS n, sum({_flag('is_final')}) AS f FROM candidates "
            f"{where('iteration', iteration)} GROUP BY iteration"))
    ).fetchall():
        out[number] = {"prompts": 0, "candidates": candidates, "final_responses": finals or 0, "excluded": 0,
                       "exclusions": {}, "excluded_finals": 0}
    for number, prompts in con.execute(
        "SELECT CAST(iteration AS INTEGER), CAST(n AS BIGINT) FROM " + live(con, (
            "SELECT iteration, count(*) AS n FROM "
            f"(SELECT DISTINCT iteration, prompt_id FROM candidates {where('iteration', iteration)}) AS t "
            "GROUP BY iteration"))
    ).fetchall():
        out[number]["prompts"] = prompts
    for number, reason, n, finals in con.execute(
        "SELECT CAST(iteration AS INTEGER), exclusion_reason, CAST(n AS BIGINT), CAST(f AS BIGINT) FROM " + live(con, (
            f"SELECT iteration, exclusion_reason, count(*) AS n, sum({_flag('is_final')}) AS f FROM candidates "
            f"WHERE exclusion_reason IS NOT NULL {where('iteration', iteration, 'AND')} "
            "GROUP BY iteration, exclusion_reason"))
        + " ORDER BY 1, 3 DESC, 2"
    ).fetchall():
        row = out[number]
        row["exclusions"][reason] = n
        row["excluded"] += n
        row["excluded_finals"] += finals or 0
    return out


# ------------------------------------------------------------ responses

def response_figures(con: duckdb.DuckDBPyConnection, iteration: int | None) -> dict[int, dict]:
    """iteration -> responses, mean words, truncated responses.

    The stored word counts are read from the covering ix_responses_figures
    (revision 0008), not the texts; rows without one (none that csr wrote)
    have their texts' words counted by DuckDB's words() macro."""
    out = {}
    for number, n, counted, words, truncated in con.execute(
        "SELECT CAST(iteration AS INTEGER), CAST(n AS BIGINT), CAST(counted AS BIGINT), CAST(words AS BIGINT), "
        "CAST(truncated AS BIGINT) FROM " + live(con, (
            f"SELECT iteration, count(*) AS n, count(word_count) AS counted, sum(word_count) AS words, "
            f"sum({_flag('is_truncated')}) AS truncated FROM responses {where('iteration', iteration)} "
            "GROUP BY iteration"))
    ).fetchall():
        out[number] = {"responses": n, "mean_words": words / counted if counted else None,
                       "truncated_responses": truncated or 0}
        if counted != n:
            (mean,) = con.execute("SELECT avg(words(text)) FROM " + live(
                con, f"SELECT text FROM responses WHERE iteration = {int(number)}")).fetchone()
            out[number]["mean_words"] = mean
    return out


# ------------------------------------------------------------ pairs

def _default_pairs(iteration: int | None, pair_ids: Iterable[int] | None = None, joins: str = "") -> str:
    ids = "" if pair_ids is None else f" AND p.id IN ({id_list(pair_ids)})"
    return (f"FROM pairs AS p JOIN pair_sets AS s ON s.id = p.pair_set_id {joins} "
            f"WHERE s.is_default {where('s.iteration', iteration, 'AND')}{ids}")


def _responses_of_pairs(con: duckdb.DuckDBPyConnection, outer: bool = False) -> str:
    """Joins from each pair `p` to its chosen (`rc`) and rejected (`rr`)
    response's figures, each one lookup in the covering
    ix_responses_pair_figures. SQLite joins by nested loops anyway;
    PostgreSQL would hash the whole responses table (texts and token ids) for
    a few thousand pairs, so there each side is a LATERAL lookup of the
    index's columns only (an index-only scan)."""
    kind = "LEFT JOIN" if outer else "JOIN"
    joins = []
    for side, alias in (("chosen", "rc"), ("rejected", "rr")):
        if _is_sqlite(con):
            # The planner prefers the unique leaf index, which then reads the row.
            joins.append(f"{kind} responses AS {alias} INDEXED BY ix_responses_pair_figures "
                         f"ON {alias}.leaf_candidate_id = p.{side}_candidate_id")
        else:
            joins.append(f"{kind} LATERAL (SELECT {_FIGURE_COLUMNS} FROM responses AS r WHERE r.leaf_candidate_id = "
                         f"p.{side}_candidate_id LIMIT 1) AS {alias} ON true")
    return " ".join(joins)


_FIGURE_COLUMNS = "r.leaf_candidate_id, r.sentence_count, r.r_t_sum, r.r_i_sum, r.token_count, r.word_count"


# One pass over the default-set pairs: per pair its two responses' figures, each
# side one lookup in ix_responses_pair_figures (revision 0009), which covers
# every column read here: no response row (texts and token ids) is read.
# The rows are kept in a DuckDB temporary table for the connection's life:
# `csr stats` (pair figures, pairs without responses, pairs over the training
# limit) and the report's plot data read that, not the store, again.
_PAIR_TABLE = "csr_default_pairs"


def _pair_store_sql(con: duckdb.DuckDBPyConnection, iteration: int | None) -> str:
    sides = []
    for side, alias in (("chosen", "rc"), ("rejected", "rr")):
        sides.append(f"{alias}.leaf_candidate_id AS {side}_leaf, {alias}.sentence_count AS {side}_sentences, "
                     f"{real(con, f'{alias}.r_t_sum', f'{side}_r_t_sum')}, "
                     f"{real(con, f'{alias}.r_i_sum', f'{side}_r_i_sum')}, "
                     f"{alias}.token_count AS {side}_tokens, "
                     f"p.{side}_words AS {side}_pair_words, "
                     f"CASE WHEN p.{side}_words IS NULL THEN p.{side}_text END AS {side}_other_text")
    rewards = ", ".join(real(con, f"p.{name}", name) for name in ("chosen_reward", "rejected_reward", "margin"))
    return ("SELECT s.iteration, s.id AS pair_set_id, s.name AS pair_set, p.id AS pair_id, p.prompt_id, "
            f"p.chosen_candidate_id, p.rejected_candidate_id, {rewards}, {', '.join(sides)} "
            + _default_pairs(iteration, joins=_responses_of_pairs(con, outer=True)))


def pair_table(con: duckdb.DuckDBPyConnection, iteration: int | None) -> str:
    """DuckDB SQL (a FROM item) of one row per default-set pair (of `iteration`)
    with both responses' figures, read from the store once per connection.

    A pair's words are its own stored count (revision 0009: the count of its
    text, which csr's curation copies from the response); a pair without one
    has its text counted by words(). `*_found` is false where the store has no
    responses row for that leaf: those pairs' figures come from the trees."""
    name = _PAIR_TABLE if iteration is None else f"{_PAIR_TABLE}_{int(iteration)}"
    everything = _temp_table_exists(con, _PAIR_TABLE)
    if iteration is not None and everything:
        return f"(SELECT * FROM {_PAIR_TABLE} WHERE iteration = {int(iteration)})"
    if everything or _temp_table_exists(con, name):
        return name
    columns = []
    for side in ("chosen", "rejected"):
        n = f"CAST({side}_sentences AS DOUBLE)"
        columns.append(
            f"{side}_leaf IS NOT NULL AS {side}_found, CAST({side}_sentences AS BIGINT) AS {side}_sentences, "
            f"CAST({side}_r_t_sum AS DOUBLE) / {n} AS {side}_mean_r_t, "
            f"CAST({side}_r_i_sum AS DOUBLE) / {n} AS {side}_mean_r_i, "
            f"CAST({side}_tokens AS BIGINT) AS {side}_token_count, "
            f"coalesce(CAST({side}_pair_words AS BIGINT), words({side}_other_text)) AS {side}_words")
    con.execute(
        f"CREATE TEMP TABLE {name} AS SELECT CAST(iteration AS INTEGER) AS iteration, "
        "CAST(pair_set_id AS INTEGER) AS pair_set_id, pair_set, true AS is_default, "
        "CAST(pair_id AS BIGINT) AS pair_id, CAST(prompt_id AS INTEGER) AS prompt_id, "
        "CAST(chosen_candidate_id AS BIGINT) AS chosen_candidate_id, "
        "CAST(rejected_candidate_id AS BIGINT) AS rejected_candidate_id, "
        "CAST(chosen_reward AS DOUBLE) AS chosen_reward, CAST(rejected_reward AS DOUBLE) AS rejected_reward, "
        f"CAST(margin AS DOUBLE) AS margin, {', '.join(columns)} "
        f"FROM {live(con, _pair_store_sql(con, iteration))}")
    return name


def _temp_table_exists(con: duckdb.DuckDBPyConnection, name: str) -> bool:
    return con.execute("SELECT count(*) FROM duckdb_tables() WHERE temporary AND table_name = "
                       f"{_literal(name)}").fetchone()[0] > 0


def pairs_without_responses(con: duckdb.DuckDBPyConnection, iteration: int | None) -> int:
    """Default-set pairs one of whose leaves has no responses row."""
    (n,) = con.execute(f"SELECT count(*) FROM {pair_table(con, iteration)} "
                       "WHERE NOT (chosen_found AND rejected_found)").fetchone()
    return n


_PAIR_COLUMNS = ("iteration, pair_set_id, pair_set, is_default, pair_id, prompt_id, chosen_candidate_id, "
                 "rejected_candidate_id, chosen_reward, rejected_reward, margin, chosen_sentences, "
                 "chosen_mean_r_t, chosen_mean_r_i, rejected_sentences, rejected_mean_r_t, rejected_mean_r_i, "
                 "chosen_words, rejected_words")


def pair_rows_sql(con: duckdb.DuckDBPyConnection, iteration: int | None,
                  pair_ids: Iterable[int] | None = None) -> str:
    """DuckDB SQL of one row per default-set pair with its responses' figures
    (the columns of the pair_responses view but the per-sentence reward);
    call only where pairs_without_responses() is 0. With `pair_ids` (a page
    of the report) only those pairs, with their texts, read from the store."""
    if pair_ids is None:
        return f"SELECT {_PAIR_COLUMNS} FROM {pair_table(con, iteration)}"
    texts = live(con, f"SELECT id, chosen_text, rejected_text FROM pairs WHERE id IN ({id_list(pair_ids)})")
    columns = ", ".join(f"pr.{name}" for name in _PAIR_COLUMNS.split(", "))
    return (f"SELECT {columns}, x.chosen_text, x.rejected_text FROM {pair_table(con, iteration)} AS pr "
            f"JOIN (SELECT CAST(id AS BIGINT) AS id, chosen_text, rejected_text FROM {texts}) AS x ON x.id = pr.pair_id")


def pairs_over_limit(con: duckdb.DuckDBPyConnection, iteration: int | None, max_tokens: int) -> dict[int, int]:
    """iteration -> default-set pairs with a response over `max_tokens`."""
    limit = int(max_tokens)
    return dict(con.execute(
        f"SELECT iteration, count(*) FROM {pair_table(con, iteration)} "
        f"WHERE chosen_token_count > {limit} OR rejected_token_count > {limit} GROUP BY iteration").fetchall())


def sample_pair_ids(con: duckdb.DuckDBPyConnection, limit: int) -> list[int]:
    """Up to `limit` default-set pair ids spread over iterations: pairs ranked by a
    hash of the prompt within each iteration, ranks taken round-robin (the same
    prompts recur in every iteration). Only pair ids cross from the store."""
    rows = con.execute(
        "SELECT CAST(pair_id AS BIGINT) FROM (SELECT CAST(iteration AS INTEGER) AS iteration, pair_id, "
        "CAST(prompt_id AS INTEGER) AS prompt_id FROM " + live(con, (
            f"SELECT s.iteration, p.id AS pair_id, p.prompt_id {_default_pairs(None)}")) + ") "
        f"QUALIFY row_number() OVER (PARTITION BY iteration ORDER BY hash(prompt_id), prompt_id) <= {int(limit)} "
        "ORDER BY row_number() OVER (PARTITION BY iteration ORDER BY hash(prompt_id), prompt_id), iteration "
        f"LIMIT {int(limit)}").fetchall()
    return [row[0] for row in rows]


def tree_nodes(con: duckdb.DuckDBPyConnection, leaf_ids: Iterable[int]) -> list[tuple]:
    """Every candidate of the trees holding `leaf_ids` (index lookups on the
    tree's (iteration, prompt_id)): id, node, parent_node, iteration, prompt_id,
    depth, text, r_t, r_i, reward, cumulative_reward."""
    trees = con.execute("SELECT DISTINCT CAST(iteration AS INTEGER), CAST(prompt_id AS INTEGER) FROM " + live(con, (
        f"SELECT iteration, prompt_id FROM candidates WHERE id IN ({id_list(leaf_ids)})"))).fetchall()
    if not trees:
        return []
    by_iteration: dict[int, list[int]] = {}
    for number, prompt in trees:
        by_iteration.setdefault(number, []).append(prompt)
    match = " OR ".join(f"(iteration = {number} AND prompt_id IN ({id_list(prompts)}))"
                        for number, prompts in sorted(by_iteration.items()))
    return con.execute(
        "SELECT CAST(id AS BIGINT), CAST(node AS INTEGER), CAST(parent_node AS INTEGER), CAST(iteration AS INTEGER), "
        "CAST(prompt_id AS INTEGER), CAST(depth AS INTEGER), text, CAST(r_t AS DOUBLE), CAST(r_i AS DOUBLE), "
        "CAST(reward AS DOUBLE), CAST(cumulative_reward AS DOUBLE) FROM " + live(con, (
            "SELECT id, node, parent_node, iteration, prompt_id, depth, text, "
            f"{', '.join(real(con, name, name) for name in ('r_t', 'r_i', 'reward', 'cumulative_reward'))} "
            f"FROM candidates WHERE {match}"))).fetchall()
