"""DuckDB over the live store, read-only.

`csr sql`, `csr stats` and `csr report` read the store through one in-memory
DuckDB connection that ATTACHes it READ_ONLY (SQLite through the sqlite
scanner, PostgreSQL through the postgres scanner), so nothing done here can
change the store, and SQLite readers never block the workers writing in WAL
mode. Every store table appears under its own name as a view in DuckDB's
main schema, with booleans and JSON given the same types on both backends,
next to three convenience views:

- `response_sentences`: one row per sentence of every final response
  (a recursive CTE from each leaf up through node/parent_node);
- `response_paths`: one row per final candidate, its path's text and reward
  sums, computed from the candidates (the store's own `responses` table holds
  the kept final responses as the search wrote them);
- `pair_stats`: pair figures per iteration and pair set.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import duckdb
from sqlalchemy import JSON, Boolean
from sqlalchemy.engine import URL, make_url

from csr.storage.db import SQLITE_BUSY_TIMEOUT_MS, is_sqlite, normalise_url, sqlite_path
from csr.storage.errors import StoreError
from csr.storage.models import Base
from csr.storage.store import open_store

ALIAS = "store"

# Words are runs of characters other than ASCII whitespace. A response is its
# sentences joined with one space, so its words are the sum of theirs.
# Most sentences are single-spaced, and splitting those on ' ' is several
# times faster than the general path (or a regular expression).
WORDS_MACRO = """
CREATE MACRO words(s) AS CASE
  WHEN s = '' OR contains(s, '  ') OR starts_with(s, ' ') OR ends_with(s, ' ')
       OR contains(s, chr(9)) OR contains(s, chr(10)) OR contains(s, chr(11))
       OR contains(s, chr(12)) OR contains(s, chr(13))
  THEN len(list_filter(
         string_split(translate(s, chr(9) || chr(10) || chr(11) || chr(12) || chr(13), '     '), ' '),
         lambda w: w <> ''))
  ELSE len(string_split(s, ' '))
END
"""

# The recursion walks up from each final candidate. The candidates are read
# once (MATERIALIZED; otherwise every step scans the attached table again),
# and the recursion carries keys only: text and rewards are joined once at
# the end, which is about three times faster than carrying them.
# `n.depth < path.depth` stops a corrupt parent cycle from recursing forever.
RESPONSE_SENTENCES_VIEW = """
CREATE VIEW response_sentences AS
WITH RECURSIVE
  nodes AS MATERIALIZED (
    SELECT id, iteration, prompt_id, node, parent_node, depth, text, r_t, r_i, reward,
           cumulative_reward, is_final, exclusion_reason, finish_reason
    FROM candidates
  ),
  path AS (
    SELECT id AS leaf_id, id AS candidate_id, iteration, prompt_id, parent_node, depth
    FROM nodes
    WHERE is_final
    UNION ALL
    SELECT path.leaf_id, n.id, path.iteration, path.prompt_id, n.parent_node, n.depth
    FROM path
    JOIN nodes AS n
      ON n.iteration = path.iteration AND n.prompt_id = path.prompt_id
     AND n.node = path.parent_node AND n.depth < path.depth
  )
SELECT path.leaf_id, n.iteration, n.prompt_id, n.id AS candidate_id, n.node, n.depth, n.text,
       n.r_t, n.r_i, n.reward, n.cumulative_reward, n.exclusion_reason, n.finish_reason
FROM path JOIN nodes AS n ON n.id = path.candidate_id
"""

# Responses are built top-down: each node extends its parent's prefix (text,
# word count, reward sums), so every candidate is visited once and no
# group-by or join back is needed; about twice as fast as aggregating
# response_sentences. A final candidate's prefix is its whole response.
RESPONSES_VIEW = """
CREATE VIEW response_paths AS
WITH RECURSIVE
  nodes AS MATERIALIZED (
    SELECT id, iteration, prompt_id, node, parent_node, depth, text, words(text) AS words, r_t, r_i,
           reward, cumulative_reward, is_final, exclusion_reason, finish_reason
    FROM candidates
  ),
  prefix AS (
    SELECT id, iteration, prompt_id, node, depth, is_final, text, words, 1 AS sentences,
           r_t AS sum_r_t, r_i AS sum_r_i, reward AS sum_reward, cumulative_reward,
           exclusion_reason, finish_reason
    FROM nodes
    WHERE parent_node IS NULL
    UNION ALL
    SELECT n.id, n.iteration, n.prompt_id, n.node, n.depth, n.is_final,
           prefix.text || n.text, prefix.words + n.words, prefix.sentences + 1,
           prefix.sum_r_t + n.r_t, prefix.sum_r_i + n.r_i, prefix.sum_reward + n.reward,
           n.cumulative_reward, n.exclusion_reason, n.finish_reason
    FROM prefix
    JOIN nodes AS n
      ON n.iteration = prefix.iteration AND n.prompt_id = prefix.prompt_id
     AND n.parent_node = prefix.node AND n.depth > prefix.depth
  )
SELECT iteration, prompt_id, id AS leaf_id, text, sentences, words, cumulative_reward,
       sum_r_t, sum_r_t / sentences AS mean_r_t, sum_r_i, sum_r_i / sentences AS mean_r_i,
       sum_reward, sum_reward / sentences AS mean_reward, exclusion_reason, finish_reason
FROM prefix
WHERE is_final
"""

# One row per pair with both responses' sentence-level figures. The
# recursion starts from the pairs' two leaves only (two per prompt instead of
# every final response), which keeps `csr stats` and the report cheap.
PAIR_RESPONSES_VIEW = """
CREATE VIEW pair_responses AS
WITH RECURSIVE
  nodes AS MATERIALIZED (
    SELECT id, iteration, prompt_id, node, parent_node, depth, r_t, r_i, reward FROM candidates
  ),
  leaves AS (
    SELECT chosen_candidate_id AS id FROM pairs UNION SELECT rejected_candidate_id FROM pairs
  ),
  path AS (
    SELECT id AS leaf_id, id AS candidate_id, iteration, prompt_id, parent_node, depth
    FROM nodes
    WHERE id IN (SELECT id FROM leaves)
    UNION ALL
    SELECT path.leaf_id, n.id, path.iteration, path.prompt_id, n.parent_node, n.depth
    FROM path
    JOIN nodes AS n
      ON n.iteration = path.iteration AND n.prompt_id = path.prompt_id
     AND n.node = path.parent_node AND n.depth < path.depth
  ),
  per_leaf AS (
    SELECT path.leaf_id, count(*) AS sentences,
           avg(n.r_t) AS mean_r_t, avg(n.r_i) AS mean_r_i, avg(n.reward) AS mean_reward
    FROM path JOIN nodes AS n ON n.id = path.candidate_id
    GROUP BY path.leaf_id
  )
SELECT s.iteration, s.id AS pair_set_id, s.name AS pair_set, s.is_default, p.id AS pair_id, p.prompt_id,
       p.chosen_candidate_id, p.rejected_candidate_id, p.chosen_reward, p.rejected_reward, p.margin,
       ch.sentences AS chosen_sentences, rj.sentences AS rejected_sentences,
       ch.mean_r_t AS chosen_mean_r_t, rj.mean_r_t AS rejected_mean_r_t,
       ch.mean_r_i AS chosen_mean_r_i, rj.mean_r_i AS rejected_mean_r_i,
       ch.mean_reward AS chosen_mean_sentence_reward, rj.mean_reward AS rejected_mean_sentence_reward,
       words(p.chosen_text) AS chosen_words, words(p.rejected_text) AS rejected_words
FROM pairs AS p
JOIN pair_sets AS s ON s.id = p.pair_set_id
LEFT JOIN per_leaf AS ch ON ch.leaf_id = p.chosen_candidate_id
LEFT JOIN per_leaf AS rj ON rj.leaf_id = p.rejected_candidate_id
"""

PAIR_STATS_VIEW = """
CREATE VIEW pair_stats AS
SELECT s.iteration, s.id AS pair_set_id, s.name AS pair_set, s.is_default, s.preset,
       count(p.id) AS pairs,
       avg(p.chosen_reward) AS chosen_mean_reward,
       avg(p.rejected_reward) AS rejected_mean_reward,
       avg(p.margin) AS margin_mean,
       min(p.margin) AS margin_min,
       quantile_cont(p.margin, 0.25) AS margin_p25,
       quantile_cont(p.margin, 0.5) AS margin_median,
       quantile_cont(p.margin, 0.75) AS margin_p75,
       max(p.margin) AS margin_max
FROM pair_sets AS s LEFT JOIN pairs AS p ON p.pair_set_id = s.id
GROUP BY s.iteration, s.id, s.name, s.is_default, s.preset
"""

CONVENIENCE_DDL = {
    "words": WORDS_MACRO,
    "response_sentences": RESPONSE_SENTENCES_VIEW,
    "response_paths": RESPONSES_VIEW,
    "pair_responses": PAIR_RESPONSES_VIEW,
    "pair_stats": PAIR_STATS_VIEW,
}

# Statement kinds `csr sql` runs; everything else (INSERT, CREATE, ATTACH,
# COPY, SET, LOAD, CALL, PRAGMA assignments, ...) is refused. DuckDB parses
# `PRAGMA table_info(...)`, `SHOW`, `DESCRIBE` and `SUMMARIZE` as SELECT.
_READ_TYPES = {duckdb.StatementType.SELECT, duckdb.StatementType.EXPLAIN}
_EXPLAIN_PREFIX = re.compile(
    r"^\s*explain\s+(?:analy[sz]e\s+)?(?:\([^)]*\)\s*)?", re.IGNORECASE
)
_LEADING_COMMENTS = re.compile(r"^(?:\s+|--[^\n]*(?:\n|$)|/\*.*?\*/)*", re.DOTALL)


@dataclass
class QueryResult:
    columns: list[str]
    rows: list[tuple]


def extension_path(name: str) -> Path:
    """The extension file shipped in the duckdb-extension-<name> wheel.

    DuckDB cannot download extensions where csr runs, so they come from pip.
    """
    package = f"duckdb_extension_{name}"
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise StoreError(f"DuckDB extension {name} is missing: pip install duckdb-extension-{name.replace('_', '-')}")
    for location in spec.submodule_search_locations:
        found = sorted(Path(location).rglob(f"{name}.duckdb_extension"))
        if found:
            return found[0]
    raise StoreError(f"no {name}.duckdb_extension file inside the {package} package")


def _quote_literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def postgres_dsn(url: URL) -> str:
    """A libpq key=value string for the postgres scanner from a SQLAlchemy URL."""
    parts = {
        "host": url.host,
        "port": str(url.port) if url.port else None,
        "user": url.username,
        "password": url.password,
        "dbname": url.database,
    }
    for key, value in url.query.items():
        parts[key] = value if isinstance(value, str) else value[-1]

    def quote(value: str) -> str:
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"

    return " ".join(f"{key}={quote(value)}" for key, value in parts.items() if value)


def _attach_statement(url: str) -> tuple[str, str, str]:
    """(extension, ATTACH statement, schema holding the store's tables)."""
    if is_sqlite(url):
        path = sqlite_path(url)
        if path is None:
            raise StoreError("an in-memory SQLite store cannot be read from another connection")
        target = _quote_literal(str(path.resolve()))
        # A reader waits out a writer's WAL checkpoint as long as the workers wait for each other.
        options = f"TYPE sqlite, READ_ONLY, BUSY_TIMEOUT {SQLITE_BUSY_TIMEOUT_MS}"
        return "sqlite_scanner", f"ATTACH {target} AS {ALIAS} ({options})", "main"
    parsed = make_url(url)
    if parsed.get_backend_name() != "postgresql":
        raise StoreError(f"csr sql reads SQLite and PostgreSQL stores, not {parsed.get_backend_name()}")
    target = _quote_literal(postgres_dsn(parsed))
    return "postgres_scanner", f"ATTACH {target} AS {ALIAS} (TYPE postgres, READ_ONLY)", "public"


@contextmanager
def connect(url: str, *, cache: Path | None = None, threads: int | None = None
            ) -> Iterator[duckdb.DuckDBPyConnection]:
    """An in-memory DuckDB connection with the store attached read-only and the views made.

    With `cache`, the candidates view reads a columnar copy kept in that
    DuckDB file, brought up to date with the store first (see _sync_cache).
    """
    url = normalise_url(url)
    # Same messages as every other command for a missing store or a schema
    # from another csr version. The engine also stays open until DuckDB has
    # closed: SQLite's read-only connections leave the -wal/-shm files behind,
    # and the read-write connection closing last removes them as usual.
    engine = open_store(url)
    try:
        con = _open_duckdb(url, cache, threads)
        try:
            yield con
        finally:
            con.close()
    finally:
        engine.dispose()


def _open_duckdb(url: str, cache: Path | None, threads: int | None) -> duckdb.DuckDBPyConnection:
    extension, attach, schema = _attach_statement(url)
    con = duckdb.connect(":memory:")
    try:
        if threads:
            con.execute(f"SET threads = {int(threads)}")
        con.execute(f"LOAD {_quote_literal(str(extension_path(extension)))}")
        try:
            con.execute(attach)
        except duckdb.Error as exc:
            raise StoreError(f"DuckDB cannot attach the store: {first_line(exc)}") from exc
        if extension == "sqlite_scanner":
            # Parallel scans open one SQLite connection per thread, each with
            # its own snapshot: a tree committed meanwhile could then be half
            # visible. One connection reads one consistent snapshot per query.
            con.execute("SET sqlite_disable_multithreaded_scans = true")
        columns = _store_columns(con, schema)
        sources = {table: f'{ALIAS}."{schema}"."{table}"' for table in columns}
        if cache is not None:
            store_file = sqlite_path(url)
            if store_file is not None and Path(cache).resolve() == store_file.resolve():
                raise StoreError("--cache must be a file of its own, not the store")
            query_function = "sqlite_query" if extension == "sqlite_scanner" else "postgres_query"
            _sync_cache(con, Path(cache), _store_key(url), query_function, sources[CACHED_TABLE],
                        _typed_select(CACHED_TABLE, columns[CACHED_TABLE]))
            sources[CACHED_TABLE] = f'{CACHE_ALIAS}."{CACHED_TABLE}"'
        for table, names in columns.items():
            cached = sources[table].startswith(CACHE_ALIAS)
            select_list = "*" if cached else _typed_select(table, names)
            con.execute(f'CREATE VIEW "{table}" AS SELECT {select_list} FROM {sources[table]}')
        for ddl in CONVENIENCE_DDL.values():
            con.execute(ddl)
        # Belt and braces next to the statement guard: no SET can undo this.
        con.execute("SET lock_configuration = true")
    except BaseException:
        con.close()
        raise
    return con


def _store_columns(con: duckdb.DuckDBPyConnection, schema: str) -> dict[str, list[str]]:
    columns: dict[str, list[str]] = {}
    for table, column in con.execute(
        "SELECT table_name, column_name FROM duckdb_columns() "
        "WHERE database_name = ? AND schema_name = ? ORDER BY table_name, column_index",
        [ALIAS, schema],
    ).fetchall():
        columns.setdefault(table, []).append(column)
    return columns


def _typed_select(table: str, names: list[str]) -> str:
    """The select list of one store table, with the same column types on both backends.

    SQLite has no boolean or JSON type, so its scanner yields integers and
    text; the casts give every query the same types everywhere.
    """
    model = Base.metadata.tables.get(table)
    select_list = []
    for name in names:
        column = model.columns.get(name) if model is not None else None
        ident = f'"{name}"'
        if column is not None and isinstance(column.type, Boolean):
            select_list.append(f"CAST({ident} AS BOOLEAN) AS {ident}")
        elif column is not None and isinstance(column.type, JSON):
            select_list.append(f"CAST({ident} AS JSON) AS {ident}")
        else:
            select_list.append(ident)
    return ", ".join(select_list)


# ------------------------------------------------ columnar cache of the candidates
#
# Through the scanners DuckDB reads the store row by row with the store's own
# engine, so a scan costs about what SQLite's own scan costs. The candidates
# table is the only large one (millions of rows per iteration) and it is
# append-only: a prompt's tree is written once, in one transaction, and never
# updated. So a DuckDB file can keep a columnar copy and fetch only the rows
# with a larger id at each connect. Deleted rows, or rows that appear below
# the copied id (PostgreSQL can commit out of id order), make the counts
# disagree and the copy is rebuilt. Rows updated in place would go unnoticed:
# no csr command does that.

CACHE_ALIAS = "cache"
CACHED_TABLE = "candidates"
_SYNC_STATE = f"""
CREATE TABLE IF NOT EXISTS {CACHE_ALIAS}.sync_state (
  table_name VARCHAR PRIMARY KEY, store VARCHAR, columns VARCHAR, max_id BIGINT, row_count BIGINT
)
"""


def _store_key(url: str) -> str:
    """Which store a cache file was filled from (no password)."""
    path = sqlite_path(url)
    if path is not None:
        return f"sqlite:{path.resolve()}"
    return make_url(url).render_as_string(hide_password=True)


def _sync_cache(con: duckdb.DuckDBPyConnection, path: Path, store_key: str, query_function: str,
                source: str, select_list: str) -> None:
    """Bring the cached copy of the candidates up to date, then attach it read-only."""
    target = f'{CACHE_ALIAS}."{CACHED_TABLE}"'
    literal = _quote_literal(str(path))
    try:
        # TYPE duckdb: never let DuckDB guess the format (it would open a SQLite file read-write).
        con.execute(f"ATTACH {literal} AS {CACHE_ALIAS} (TYPE duckdb)")
    except duckdb.Error as exc:
        raise StoreError(
            f"cannot open the analytics cache {path} (is another csr using it?): {first_line(exc)}"
        ) from exc

    def live(sql: str) -> str:
        """A query the store itself runs (sqlite_query / postgres_query)."""
        return f"{query_function}({_quote_literal(ALIAS)}, {_quote_literal(sql)})"

    try:
        con.execute("BEGIN TRANSACTION")
        con.execute(_SYNC_STATE)
        state = con.execute(
            f"SELECT store, columns, max_id FROM {CACHE_ALIAS}.sync_state WHERE table_name = ?",
            [CACHED_TABLE],
        ).fetchone()
        rebuild = state is None or state[0] != store_key or state[1] != select_list
        if not rebuild:
            # Rows committed since the last sync: a range scan on the primary key.
            above = int(state[2] or 0)
            con.execute(f"INSERT INTO {target} SELECT {select_list} "
                        f"FROM {live(f'SELECT * FROM {CACHED_TABLE} WHERE id > {above}')}")
            max_id, copied = con.execute(f"SELECT max(id), count(*) FROM {target}").fetchone()
            # One statement, one snapshot of the store: its rows up to max_id
            # must be exactly the copied ones. count(*) of the whole table
            # reads an index; only the rows above max_id are walked.
            (stored,) = con.execute("SELECT CAST(n AS BIGINT) FROM " + live(
                f"SELECT (SELECT count(*) FROM {CACHED_TABLE}) - "
                f"(SELECT count(*) FROM {CACHED_TABLE} WHERE id > {int(max_id or 0)}) AS n"
            )).fetchone()
            rebuild = stored != copied
        if rebuild:
            con.execute(f"CREATE OR REPLACE TABLE {target} AS SELECT {select_list} FROM {source}")
            max_id, copied = con.execute(f"SELECT max(id), count(*) FROM {target}").fetchone()
        con.execute(f"DELETE FROM {CACHE_ALIAS}.sync_state WHERE table_name = ?", [CACHED_TABLE])
        con.execute(f"INSERT INTO {CACHE_ALIAS}.sync_state VALUES (?, ?, ?, ?, ?)",
                    [CACHED_TABLE, store_key, select_list, max_id, copied])
        con.execute("COMMIT")
    except BaseException:
        with contextlib.suppress(duckdb.Error):
            con.execute("ROLLBACK")
        raise
    # Queries then read the copy through a read-only attachment.
    con.execute(f"DETACH {CACHE_ALIAS}")
    con.execute(f"ATTACH {literal} AS {CACHE_ALIAS} (TYPE duckdb, READ_ONLY)")


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def read_statements(query: str) -> list[str]:
    """The statements of `query`, refusing any that is not a read (StoreError)."""
    try:
        statements = duckdb.extract_statements(query)
    except duckdb.Error as exc:
        raise StoreError(f"query does not parse: {first_line(exc)}") from exc
    if not statements:
        raise StoreError("empty query")
    texts = []
    for statement in statements:
        _check_read(statement)
        texts.append(statement.query)
    return texts


def _check_read(statement) -> None:
    kind = statement.type
    if kind == duckdb.StatementType.EXPLAIN:
        # EXPLAIN ANALYZE runs the statement it explains, so that one must be a read too.
        inner = _EXPLAIN_PREFIX.sub("", _LEADING_COMMENTS.sub("", statement.query), count=1)
        try:
            inner_statements = duckdb.extract_statements(inner)
        except duckdb.Error:
            inner_statements = []
        if len(inner_statements) != 1 or inner_statements[0].type not in _READ_TYPES:
            raise StoreError("csr sql is read-only: EXPLAIN is allowed only for a read statement")
        _check_read(inner_statements[0])
        return
    if kind not in _READ_TYPES:
        name = kind.name if hasattr(kind, "name") else str(kind)
        raise StoreError(
            f"csr sql is read-only: {name} statements are refused "
            "(allowed: SELECT, WITH, FROM, VALUES, SHOW, DESCRIBE, SUMMARIZE, PRAGMA reads, EXPLAIN)"
        )


def fetch(con: duckdb.DuckDBPyConnection, sql: str, params: Sequence | None = None) -> QueryResult:
    """Run one (already checked) statement; DuckDB errors become StoreError."""
    try:
        cursor = con.execute(sql, params) if params is not None else con.execute(sql)
        columns = [d[0] for d in cursor.description] if cursor.description else []
        rows = cursor.fetchall() if cursor.description else []
    except duckdb.Error as exc:
        raise StoreError(f"query failed: {first_line(exc)}") from exc
    return QueryResult(columns, rows)


def records(result: QueryResult) -> list[dict]:
    return [dict(zip(result.columns, row, strict=True)) for row in result.rows]


def clean_number(value):
    """NaN and infinities (empty aggregates, odd data) as None, so JSON stays valid."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


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
FROM pair_responses
WHERE is_default {and_where}
GROUP BY iteration, pair_set
"""

# Responses the search cut at max_length, and default-set pairs that training
# would leave out (a response longer than its max_response_tokens).
_LENGTH_LIMITS = """
SELECT r.iteration,
       count(*) FILTER (WHERE r.is_truncated) AS truncated_responses,
       count(DISTINCT p.id) FILTER (WHERE r.token_count > ?) AS pairs_over_training_limit
FROM responses AS r
LEFT JOIN pairs AS p ON r.leaf_candidate_id IN (p.chosen_candidate_id, p.rejected_candidate_id)
     AND p.pair_set_id IN (SELECT id FROM pair_sets WHERE is_default)
{where}
GROUP BY r.iteration
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
    pair_where = and_where
    for row in records(fetch(con, _PAIR_FIGURES.format(and_where=pair_where), params)):
        target = by_number[row.pop("iteration")]
        target["margin"] = {key.removeprefix("margin_"): row.pop(key) for key in MARGIN_FIELDS}
        target.update(row)
    limits = _LENGTH_LIMITS.format(where=_filter("r.iteration", iteration))
    for row in records(fetch(con, limits, [max_response_tokens, *params])):
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
FROM pair_responses AS pr
JOIN pairs AS p ON p.id = pr.pair_id
JOIN prompts AS pt ON pt.id = pr.prompt_id
JOIN images AS im ON im.id = pt.image_id
WHERE pr.is_default
QUALIFY row_number() OVER (PARTITION BY pr.iteration ORDER BY hash(pr.prompt_id), pr.prompt_id) <= ?
ORDER BY row_number() OVER (PARTITION BY pr.iteration ORDER BY hash(pr.prompt_id), pr.prompt_id), pr.iteration
LIMIT ?
"""

_PATH_SENTENCES = """
WITH RECURSIVE
  nodes AS MATERIALIZED (
    SELECT id, iteration, prompt_id, node, parent_node, depth, text, r_t, r_i, reward, cumulative_reward
    FROM candidates
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
    return _clean(records(fetch(con, _PAIR_SAMPLE, [limit, limit])))


def path_sentences(con: duckdb.DuckDBPyConnection, leaf_ids: Sequence[int]) -> dict[int, list[dict]]:
    """leaf id -> its sentences from depth 0 down, each with R_T, R_I, R(s) and the running reward."""
    if not leaf_ids:
        return {}
    out: dict[int, list[dict]] = {int(leaf): [] for leaf in leaf_ids}
    for row in records(fetch(con, _PATH_SENTENCES, [list(map(int, leaf_ids))])):
        out[row.pop("leaf_id")].append(_clean(row))
    return out


def pair_distributions(con: duckdb.DuckDBPyConnection) -> list[dict]:
    """Per default pair: iteration, rewards, mean R_I / R_T and words of chosen and rejected (plots)."""
    return _clean(records(fetch(con, """
        SELECT iteration, chosen_reward, rejected_reward, chosen_mean_r_i, rejected_mean_r_i,
               chosen_mean_r_t, rejected_mean_r_t, chosen_words, rejected_words
        FROM pair_responses WHERE is_default ORDER BY iteration, pair_id
    """)))
