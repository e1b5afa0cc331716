"""Engine creation for the store: SQLite (default) or any SQLAlchemy URL."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from csr.storage.errors import NoStore, StoreError

DEFAULT_URL = "sqlite:///csr.db"
SQLITE_BUSY_TIMEOUT_MS = 60_000

# The packages the store runs on, for `csr env`'s report.
STORE_PACKAGES = ("sqlalchemy", "alembic", "psycopg", "duckdb")


def normalise_url(url: str) -> str:
    """Accept a bare path as SQLite and pick the psycopg 3 driver for plain postgresql:// URLs."""
    if "://" not in url:
        return f"sqlite:///{url}"
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise StoreError(f"not a database URL: {url!r}") from exc
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed.render_as_string(hide_password=False)


def display_url(url: str) -> str:
    """The URL as csr shows it: the password hidden."""
    return make_url(url).render_as_string(hide_password=True)


def is_sqlite(url: str) -> bool:
    return make_url(url).get_backend_name() == "sqlite"


def sqlite_path(url: str) -> Path | None:
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or not parsed.database or parsed.database == ":memory:":
        return None
    return Path(parsed.database)


def make_engine(url: str, *, must_exist: bool = False) -> Engine:
    url = normalise_url(url)
    if is_sqlite(url):
        path = sqlite_path(url)
        if must_exist and (path is None or not path.exists()):
            raise NoStore(f"no store at {path}")
        engine = create_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000})
        _configure_sqlite(engine)
        return engine
    try:
        return create_engine(url, pool_pre_ping=True)
    except Exception as exc:  # unknown dialect or missing driver
        raise StoreError(f"cannot use database URL {url!r}: {exc}") from exc


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: sqlite3.Connection, _record) -> None:
        # SQLAlchemy emits BEGIN itself (below) so that claims can ask for BEGIN IMMEDIATE.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection) -> None:
        # A writer that will write must take the lock up front: a deferred
        # transaction upgrading to a writer fails with "database is locked"
        # without waiting for busy_timeout.
        mode = connection.get_execution_options().get("sqlite_begin", "IMMEDIATE")
        connection.exec_driver_sql(f"BEGIN {mode}")
