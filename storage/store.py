"""The one door to a csr store: `Store`.

Engine and cli code open a `Store` and call its methods; they never see a
connection, a transaction mode, SQL or a SQLAlchemy error (each comes out as
StoreUnavailable, StoreRefused or WriteConflict, storage/errors.py); a caller
that must ride out an outage calls through `store.retrying(seconds)`. The
store chooses the transaction: a deferred one for reads (SQLite readers never
take the lock workers need), an immediate one for writes (SQLite `BEGIN
IMMEDIATE`; PostgreSQL takes row locks where the queue needs them). Each
method is one transaction; a step that must be atomic is one method.

The parts live in their own modules, each a set of functions over a
connection: prompts, iterations, work (the queue), workers, trees, curation,
versions, evaluations, summary; analytics reads the live store through DuckDB.
`open_store` / `create_store` below are the storage-internal openers the
tests of those modules use.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

from sqlalchemy import Connection, Engine
from sqlalchemy.exc import DBAPIError, IntegrityError, SQLAlchemyError

from csr.storage import (
    curation,
    evaluations,
    iterations,
    migrate,
    outside_pairs,
    prompts,
    self_reward_curation,
    summary,
    versions,
    work,
    workers,
)
from csr.storage.db import make_engine
from csr.storage.errors import NotAStore, StoreError, StoreRefused, StoreUnavailable, WriteConflict
from csr.storage.outages import OutageRetry, first_line, is_outage


@contextmanager
def reading(engine: Engine) -> Iterator[Connection]:
    """A read transaction. On SQLite a deferred BEGIN, so that readers never
    take the write lock that workers need; on PostgreSQL a plain transaction."""
    with engine.connect().execution_options(sqlite_begin="DEFERRED") as conn:
        yield conn


def writing(engine: Engine):
    """A write transaction (SQLite: BEGIN IMMEDIATE, the engine's default mode)."""
    return engine.begin()


def analyze(engine: Engine, tables: tuple[str, ...]) -> None:
    """PostgreSQL: fresh planner statistics for tables csr has just filled.

    Without them (autovacuum off, or not yet run) the planner takes a table
    of millions of rows for an empty one and joins by nested loops. SQLite
    plans from its indexes and needs nothing here.

    VACUUM (ANALYZE), not ANALYZE alone: it also marks the new pages all-visible,
    without which (autovacuum off) every index-only scan reads the heap too,
    and `csr stats` counts candidates from their indexes. It reads only the
    pages written since the last one, and runs outside a transaction.
    """
    if engine.dialect.name != "postgresql":
        return
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        for table in tables:
            conn.exec_driver_sql(f"VACUUM (ANALYZE) {table}")


# PostgreSQL's own autovacuum rule: analyze once a table changed by a tenth.
_GROWN = """
SELECT relname FROM pg_stat_user_tables
WHERE relname IN ({names})
  AND n_mod_since_analyze > 50 + 0.1 * GREATEST(n_live_tup - n_mod_since_analyze, 0)
"""


def analyze_if_grown(engine: Engine, tables: tuple[str, ...]) -> None:
    """PostgreSQL: `analyze` the tables that grew by a tenth since their last
    statistics (after a batch of trees); a cheap look at pg_stat otherwise."""
    if engine.dialect.name != "postgresql":
        return
    names = ", ".join(f"'{table}'" for table in tables)
    with engine.connect() as conn:
        grown = tuple(conn.exec_driver_sql(_GROWN.format(names=names)).scalars())
        conn.rollback()
    if grown:
        analyze(engine, grown)


def open_store(url: str) -> Engine:
    """An engine on an existing store whose schema revision matches this code."""
    engine = make_engine(url, must_exist=True)
    try:
        migrate.check_revision(engine)
    except StoreError:
        engine.dispose()
        raise
    except Exception as exc:  # server down, bad credentials, not a database
        engine.dispose()
        raise StoreError(f"cannot open the store at {engine.url.render_as_string()}: {first_line(exc)}") from exc
    return engine


def create_store(url: str) -> tuple[Engine, str]:
    """Create a new store at head, or confirm an existing one; returns (engine, what happened)."""
    engine = make_engine(url)
    try:
        if migrate.is_empty(engine):
            migrate.upgrade(engine)
            return engine, "created"
        if migrate.current_revision(engine) is None:
            raise NotAStore(f"the database at {engine.url.render_as_string()} has tables but is not a csr store")
        migrate.check_revision(engine)
        return engine, "exists"
    except StoreError:
        engine.dispose()
        raise
    except Exception as exc:
        engine.dispose()
        raise StoreError(f"cannot create the store at {engine.url.render_as_string()}: {first_line(exc)}") from exc


def upgrade_store(url: str) -> tuple[str | None, str]:
    """`csr db upgrade`: migrate an existing store to head; returns (before, after)."""
    engine = make_engine(url, must_exist=True)
    try:
        if migrate.current_revision(engine) is None and not migrate.is_empty(engine):
            raise NotAStore(f"the database at {engine.url.render_as_string()} has tables but is not a csr store")
        return migrate.upgrade(engine)
    except DBAPIError as exc:  # server down, not a database, a migration the data refuses
        raise StoreError(f"cannot upgrade the store at {engine.url.render_as_string()}: {first_line(exc)}") from exc
    finally:
        engine.dispose()


def store_revision(url: str) -> str | None:
    """The schema revision of an existing store (None for a database that is not a csr store)."""
    engine = make_engine(url, must_exist=True)
    try:
        return migrate.current_revision(engine)
    except DBAPIError as exc:
        raise StoreError(f"cannot open the store at {engine.url.render_as_string()}: {first_line(exc)}") from exc
    finally:
        engine.dispose()


@contextmanager
def translated() -> Iterator[None]:
    """SQLAlchemy's errors as csr's: an outage (retry it) or a refusal (do not)."""
    try:
        yield
    except SQLAlchemyError as exc:
        if is_outage(exc):
            raise StoreUnavailable(first_line(exc)) from exc
        raise StoreRefused(first_line(exc)) from exc


# The tables a tree batch fills, and that curation and the queue plan on.
TREE_TABLES = ("candidates", "responses", "work_items")

# Tests hold a curation (a real second process) at a known point: with this
# set to a file path, the curation writes the point's name there and waits
# until the file is gone (at most a minute).
PAUSE_ENV = "CSR_TEST_PAUSE_FILE"


def _pause_for_tests(point: str) -> None:
    path = os.environ.get(PAUSE_ENV)
    if not path:
        return
    Path(path).write_text(point)
    deadline = time.monotonic() + 60
    while Path(path).exists() and time.monotonic() < deadline:
        time.sleep(0.02)


def _bound(transaction: str):
    """A storage function of (connection, ...) as a Store method that runs in a
    transaction of its own: `_reading` or `_writing` (committed when it returns,
    rolled back, nothing written, when it raises)."""

    def bind(function):
        @functools.wraps(function)
        def method(self, *args, **kwargs):
            with getattr(self, transaction)() as conn:
                return function(conn, *args, **kwargs)

        return method

    return bind


_reads, _writes = _bound("_reading"), _bound("_writing")


def _translating(function):
    """A storage function of (engine, ...) that chooses its own transactions
    (the queue's locks) as a Store method whose errors come out as csr's."""

    @functools.wraps(function)
    def method(self, *args, **kwargs):
        with translated():
            return function(self._engine, *args, **kwargs)

    return method


class Store:
    """An open csr store. Close it (or use it as a context manager) when done.

    Each method is one transaction; what must be atomic is one method."""

    def __init__(self, engine: Engine):
        self._engine = engine

    @classmethod
    def open(cls, url: str) -> Store:
        """An existing store whose schema revision matches this code."""
        return cls(open_store(url))

    @classmethod
    def create(cls, url: str) -> tuple[Store, str]:
        """A new store at head, or an existing one confirmed; returns (store, "created" | "exists")."""
        engine, what = create_store(url)
        return cls(engine), what

    upgrade = staticmethod(upgrade_store)
    revision = staticmethod(store_revision)
    head_revision = staticmethod(migrate.head_revision)

    def close(self) -> None:
        self._engine.dispose()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def reconnect(self) -> None:
        """Drop every pooled connection: after an outage they may all be dead."""
        self._engine.dispose()

    def retrying(self, bound_seconds: float, say=lambda line: None) -> OutageRetry:
        """A caller of this store's methods that retries them through an outage
        for up to `bound_seconds` (storage/outages.py)."""
        return OutageRetry(self.reconnect, bound_seconds, say)

    @contextmanager
    def _reading(self) -> Iterator[Connection]:
        with translated(), reading(self._engine) as conn:
            yield conn

    @contextmanager
    def _writing(self) -> Iterator[Connection]:
        """A unique row another writer committed first (PostgreSQL; SQLite
        serialises writers) comes out as WriteConflict."""
        with translated():
            try:
                with writing(self._engine) as conn:
                    yield conn
            except IntegrityError as exc:
                raise WriteConflict(first_line(exc)) from exc

    # -- prompts, images and the study's models -----------------------------------------
    existing_prompts = _reads(prompts.existing_prompts)
    add_prompts = _writes(prompts.add_prompts)
    prompt_inputs = _reads(iterations.prompt_inputs)
    model_version = _reads(versions.model_version)
    register_base_model = _writes(versions.register_base_model)
    lineage = _reads(versions.lineage)
    status = _reads(summary.status)

    # -- iterations and the work queue: the queue's calls take the locks they need -------
    iteration = _reads(iterations.get_iteration)
    progress = _reads(iterations.progress)
    start_iteration = _translating(iterations.start_iteration)
    retry_failed = _translating(iterations.retry_failed)
    register_worker = _translating(workers.register_worker)
    heartbeat = _translating(workers.heartbeat)
    stop_worker = _translating(workers.stop_worker)
    write_tree = _translating(work.write_tree)
    fail = _translating(work.fail)
    release = _translating(work.release)
    release_unheld = _translating(work.release_unheld)

    def outstanding(self, iteration: int, worker_id: int) -> tuple[int, list[workers.Holder]]:
        """(pending prompts, other workers holding prompts) of the iteration, in one read."""
        with self._reading() as conn:
            return (iterations.progress(conn, iteration)[iterations.PENDING],
                    workers.holders(conn, iteration, exclude_worker=worker_id))

    @_translating
    def claim(engine, iteration: int, worker_id: int, limit: int, lease: timedelta, max_attempts: int) -> list[work.Claim]:
        """Claim the next items; first, after the previous batch of trees, fresh
        planner statistics where the tables grew (PostgreSQL)."""
        analyze_if_grown(engine, TREE_TABLES)
        return work.claim(engine, iteration, worker_id, limit, lease, max_attempts)

    @_translating
    def finish_iteration_if_done(engine, iteration: int) -> bool:
        analyze_if_grown(engine, TREE_TABLES)
        return iterations.finish_iteration_if_done(engine, iteration)

    # -- curation, pair sets and training ------------------------------------------------
    pair_set = _reads(curation.pair_set)
    training_rows = _reads(curation.training_rows)
    pair_clip_means = _reads(curation.pair_clip_means)
    curate_self_reward = _writes(self_reward_curation.curate)
    imported_pair_set = _reads(outside_pairs.imported_pair_set)
    add_imported_pair_set = _writes(outside_pairs.add_pair_set)
    outside_training_rows = _reads(outside_pairs.training_rows)
    start_outside_iteration = _writes(outside_pairs.start_outside_iteration)
    begin_training_run = _writes(versions.begin_training_run)
    mark_run = _writes(versions.mark_run)
    register_version = _writes(versions.register_version)

    @_translating
    def curate(engine, iteration: int, settings: curation.CurationSettings, name: str | None = None,
               make_default: bool = False) -> curation.CurationResult:
        """Select the pairs in a read transaction, which takes no lock, then
        record them in one short write: other commands and workers never wait
        for a curation's query."""
        analyze(engine, ("responses",))  # the table the selection reads: always fresh
        analyze_if_grown(engine, TREE_TABLES)
        with reading(engine) as conn:
            selection = curation.compute_selection(conn, iteration, settings, name)
            _pause_for_tests("selected")
        try:
            with writing(engine) as conn:
                return curation.record(conn, selection, make_default=make_default)
        except IntegrityError as exc:
            raise WriteConflict(first_line(exc)) from exc

    # -- evaluations ---------------------------------------------------------------------
    find_evaluation = _reads(evaluations.find_evaluation)
    record_evaluation = _writes(evaluations.record_evaluation)
