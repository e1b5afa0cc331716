"""DuckDB over the live store, read-only.

`csr sql`, `csr stats` and `csr report` read the store through one in-memory
DuckDB connection that ATTACHes it READ_ONLY (sqlite or postgres scanner), so
nothing here can change the store and SQLite readers never block the workers.
Every store table is a view under its own name (booleans and JSON typed alike
on both backends), next to the convenience views `response_sentences`,
`response_paths`, `pair_responses` and `pair_stats` (docs/analytics.md).
"""

from __future__ import annotations

import importlib.util
import math
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import duckdb
from sqlalchemy import JSON, Boolean
from sqlalchemy.engine import URL, make_url

from csr.storage.analytics_cache import CACHE_ALIAS, CACHED_TABLE, store_key, sync_cache
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
# `pair_responses_sql` fills the two filters: none for the view, the default
# pair sets of one iteration (and only that iteration's candidates) for
# `csr stats --iter N`.
PAIR_RESPONSES_SQL = """
WITH RECURSIVE
  chosen_pairs AS (
    SELECT s.iteration, s.id AS pair_set_id, s.name AS pair_set, s.is_default, p.id AS pair_id, p.prompt_id,
           p.chosen_candidate_id, p.rejected_candidate_id, p.chosen_reward, p.rejected_reward, p.margin,
           p.chosen_text, p.rejected_text
    FROM pairs AS p JOIN pair_sets AS s ON s.id = p.pair_set_id {pair_where}
  ),
  nodes AS MATERIALIZED (
    SELECT id, iteration, prompt_id, node, parent_node, depth, r_t, r_i, reward FROM candidates {node_where}
  ),
  leaves AS (
    SELECT chosen_candidate_id AS id FROM chosen_pairs UNION SELECT rejected_candidate_id FROM chosen_pairs
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
SELECT p.iteration, p.pair_set_id, p.pair_set, p.is_default, p.pair_id, p.prompt_id,
       p.chosen_candidate_id, p.rejected_candidate_id, p.chosen_reward, p.rejected_reward, p.margin,
       ch.sentences AS chosen_sentences, rj.sentences AS rejected_sentences,
       ch.mean_r_t AS chosen_mean_r_t, rj.mean_r_t AS rejected_mean_r_t,
       ch.mean_r_i AS chosen_mean_r_i, rj.mean_r_i AS rejected_mean_r_i,
       ch.mean_reward AS chosen_mean_sentence_reward, rj.mean_reward AS rejected_mean_sentence_reward,
       words(p.chosen_text) AS chosen_words, words(p.rejected_text) AS rejected_words
FROM chosen_pairs AS p
LEFT JOIN per_leaf AS ch ON ch.leaf_id = p.chosen_candidate_id
LEFT JOIN per_leaf AS rj ON rj.leaf_id = p.rejected_candidate_id
"""


def pair_responses_sql(pair_where: str = "", node_where: str = "") -> str:
    return PAIR_RESPONSES_SQL.format(pair_where=pair_where, node_where=node_where)


PAIR_RESPONSES_VIEW = "CREATE VIEW pair_responses AS" + pair_responses_sql()

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
        raise StoreError(f"the analytics reads SQLite and PostgreSQL stores, not {parsed.get_backend_name()}")
    target = _quote_literal(postgres_dsn(parsed))
    return "postgres_scanner", f"ATTACH {target} AS {ALIAS} (TYPE postgres, READ_ONLY)", "public"


@contextmanager
def connect(url: str, *, cache: Path | None = None, threads: int | None = None
            ) -> Iterator[duckdb.DuckDBPyConnection]:
    """An in-memory DuckDB connection with the store attached read-only and the views made.

    With `cache`, the candidates view reads a columnar copy kept in that
    DuckDB file, brought up to date with the store first (storage/analytics_cache.py).
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
        columns = _store_columns(con, extension)
        sources = {table: f'{ALIAS}."{schema}"."{table}"' for table in columns}
        if cache is not None:
            store_file = sqlite_path(url)
            if store_file is not None and Path(cache).resolve() == store_file.resolve():
                raise StoreError("the analytics cache must be a file of its own, not the store")
            query_function = "sqlite_query" if extension == "sqlite_scanner" else "postgres_query"
            sync_cache(con, Path(cache), store_key(url), query_function, sources[CACHED_TABLE],
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


# The store's own catalogue, asked through the scanner's query function:
# DuckDB's duckdb_columns() over an attached SQLite file costs seconds per
# million candidates (it sizes every table), this costs milliseconds.
_COLUMNS_QUERY = {
    "sqlite_scanner": ("sqlite_query", "SELECT m.name AS table_name, p.name AS column_name FROM sqlite_master AS m, "
                                       "pragma_table_info(m.name) AS p WHERE m.type = 'table' ORDER BY m.name, p.cid"),
    "postgres_scanner": ("postgres_query", "SELECT table_name, column_name FROM information_schema.columns "
                                           "WHERE table_schema = 'public' ORDER BY table_name, ordinal_position"),
}


def _store_columns(con: duckdb.DuckDBPyConnection, extension: str) -> dict[str, list[str]]:
    function, query = _COLUMNS_QUERY[extension]
    columns: dict[str, list[str]] = {}
    for table, column in con.execute(
        f"SELECT table_name, column_name FROM {function}({_quote_literal(ALIAS)}, {_quote_literal(query)})"
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
            raise StoreError("the analytics connection is read-only: EXPLAIN is allowed only for a read statement")
        _check_read(inner_statements[0])
        return
    if kind not in _READ_TYPES:
        name = kind.name if hasattr(kind, "name") else str(kind)
        raise StoreError(
            f"the analytics connection is read-only: {name} statements are refused "
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


# The figures live in their own module; callers use them from here.
from csr.storage.analytics_figures import (  # noqa: E402, F401
    benchmark_table,
    pair_distributions,
    pair_sample,
    path_sentences,
    ri_histograms,
    stats,
)
