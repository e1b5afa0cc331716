"""The columnar cache of the candidates behind `csr stats --cache` / `csr sql --cache`."""

from __future__ import annotations

import contextlib
from pathlib import Path

import duckdb
from sqlalchemy.engine import make_url

from csr.storage.db import sqlite_path
from csr.storage.errors import StoreError

ALIAS = "store"


def _quote_literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


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


def store_key(url: str) -> str:
    """Which store a cache file was filled from (no password)."""
    path = sqlite_path(url)
    if path is not None:
        return f"sqlite:{path.resolve()}"
    return make_url(url).render_as_string(hide_password=True)


def sync_cache(con: duckdb.DuckDBPyConnection, path: Path, store_key: str, query_function: str,
                source: str, select_list: str) -> None:
    """Bring the cached copy of the candidates up to date, then attach it read-only."""
    target = f'{CACHE_ALIAS}."{CACHED_TABLE}"'
    literal = _quote_literal(str(path))
    try:
        # TYPE duckdb: never let DuckDB guess the format (it would open a SQLite file read-write).
        con.execute(f"ATTACH {literal} AS {CACHE_ALIAS} (TYPE duckdb)")
    except duckdb.Error as exc:
        raise StoreError(
            f"cannot open the analytics cache {path} (is another csr using it?): {_first_line(exc)}"
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
