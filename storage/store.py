"""The one door to a csr store: `Store`.

Engine and cli code open a `Store` and call its methods; they never see a
connection, a transaction mode or SQL. The store chooses the transaction: a
deferred one for reads (SQLite readers never take the lock workers need), an
immediate one for writes (SQLite `BEGIN IMMEDIATE`; PostgreSQL takes row locks
where the queue needs them). Work that must happen in one transaction runs in
`store.read()` / `store.write()`, whose `Transaction` has the same parts.

The parts live in their own modules, each a set of functions over a
connection: prompts, work (the queue), trees, curation, versions,
evaluations, summary; analytics reads the live store through DuckDB.
`open_store` / `create_store` below are the storage-internal openers the
tests of those modules use.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta

from sqlalchemy import Connection, Engine
from sqlalchemy.exc import DBAPIError, IntegrityError

from csr.storage import migrate, work
from csr.storage.db import make_engine
from csr.storage.errors import StoreError, WriteConflict
from csr.storage.transaction import Transaction
from csr.storage.trees import Tree


@contextmanager
def reading(engine: Engine) -> Iterator[Connection]:
    """A read transaction. On SQLite a deferred BEGIN, so that readers never
    take the write lock that workers need; on PostgreSQL a plain transaction."""
    with engine.connect().execution_options(sqlite_begin="DEFERRED") as conn:
        yield conn


def writing(engine: Engine):
    """A write transaction (SQLite: BEGIN IMMEDIATE, the engine's default mode)."""
    return engine.begin()


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
        raise StoreError(f"cannot open the store at {engine.url.render_as_string()}: {_first_line(exc)}") from exc
    return engine


def create_store(url: str) -> tuple[Engine, str]:
    """Create a new store at head, or confirm an existing one; returns (engine, what happened)."""
    engine = make_engine(url)
    try:
        if migrate.is_empty(engine):
            migrate.upgrade(engine)
            return engine, "created"
        if migrate.current_revision(engine) is None:
            raise StoreError(
                f"the database at {engine.url.render_as_string()} has tables but is not a csr store: "
                "point --db / CSR_DATABASE_URL at an empty database or an existing csr store"
            )
        migrate.check_revision(engine)
        return engine, "exists"
    except StoreError:
        engine.dispose()
        raise
    except Exception as exc:
        engine.dispose()
        raise StoreError(f"cannot create the store at {engine.url.render_as_string()}: {_first_line(exc)}") from exc


def upgrade_store(url: str) -> tuple[str | None, str]:
    """`csr db upgrade`: migrate an existing store to head; returns (before, after)."""
    engine = make_engine(url, must_exist=True)
    try:
        if migrate.current_revision(engine) is None and not migrate.is_empty(engine):
            raise StoreError(f"the database at {engine.url.render_as_string()} has tables but is not a csr store")
        return migrate.upgrade(engine)
    except DBAPIError as exc:  # server down, not a database, a migration the data refuses
        raise StoreError(f"cannot upgrade the store at {engine.url.render_as_string()}: {_first_line(exc)}") from exc
    finally:
        engine.dispose()


def store_revision(url: str) -> str | None:
    """The schema revision of an existing store (None for a database that is not a csr store)."""
    engine = make_engine(url, must_exist=True)
    try:
        return migrate.current_revision(engine)
    except DBAPIError as exc:
        raise StoreError(f"cannot open the store at {engine.url.render_as_string()}: {_first_line(exc)}") from exc
    finally:
        engine.dispose()


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


class Store:
    """An open csr store. Close it (or use it as a context manager) when done."""

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

    def close(self) -> None:
        self._engine.dispose()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def reconnect(self) -> None:
        """Drop every pooled connection: after an outage they may all be dead."""
        self._engine.dispose()

    @contextmanager
    def read(self) -> Iterator[Transaction]:
        with reading(self._engine) as conn:
            yield Transaction(conn, writable=False)

    @contextmanager
    def write(self) -> Iterator[Transaction]:
        """A write transaction: committed on exit, rolled back (and nothing
        written) on an exception. A unique row another writer committed first
        (PostgreSQL; SQLite serialises writers) comes out as WriteConflict."""
        try:
            with writing(self._engine) as conn:
                yield Transaction(conn, writable=True)
        except IntegrityError as exc:
            raise WriteConflict(_first_line(exc)) from exc

    # -- one-transaction shortcuts ------------------------------------------------------
    def model_version(self, version: int):
        with self.read() as tx:
            return tx.model_version(version)

    def iteration(self, number: int):
        with self.read() as tx:
            return tx.iteration(number)

    def progress(self, iteration: int) -> dict[str, int]:
        with self.read() as tx:
            return tx.progress(iteration)

    # -- the work queue: each call is its own transaction, with the locks it needs --------
    def start_iteration(self, number: int, preset: str, config: dict) -> tuple[dict, bool]:
        return work.start_iteration(self._engine, number, preset, config)

    def retry_failed(self, iteration: int) -> int:
        return work.retry_failed(self._engine, iteration)

    def register_worker(self, iteration: int, device: str) -> int:
        return work.register_worker(self._engine, iteration, device)

    def claim(self, iteration: int, worker_id: int, limit: int, lease: timedelta, max_attempts: int) -> list[work.Claim]:
        return work.claim(self._engine, iteration, worker_id, limit, lease, max_attempts)

    def heartbeat(self, worker_id: int, lease: timedelta) -> None:
        work.heartbeat(self._engine, worker_id, lease)

    def complete(self, claim: work.Claim, worker_id: int, iteration: int, tree: Tree) -> bool:
        """Write the claim's whole tree and mark it done, in one transaction."""
        return work.complete(self._engine, claim, worker_id, iteration, tree)

    def fail(self, claim: work.Claim, worker_id: int, error: str, max_attempts: int) -> str:
        return work.fail(self._engine, claim, worker_id, error, max_attempts)

    def release(self, worker_id: int, claims: list[work.Claim]) -> None:
        work.release(self._engine, worker_id, claims)

    def release_unheld(self, worker_id: int) -> int:
        return work.release_unheld(self._engine, worker_id)

    def stop_worker(self, worker_id: int) -> None:
        work.stop_worker(self._engine, worker_id)

    def finish_iteration_if_done(self, iteration: int) -> bool:
        return work.finish_iteration_if_done(self._engine, iteration)
