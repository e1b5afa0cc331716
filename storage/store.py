"""Opening, creating and summarising a store."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import Connection, Engine, func, select, update
from sqlalchemy.exc import DBAPIError

from csr.storage import migrate, work
from csr.storage.clock import utcnow
from csr.storage.db import make_engine
from csr.storage.errors import StoreError
from csr.storage.models import Iteration, ModelVersion, Prompt, WorkItem


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


def model_version(conn: Connection, version: int):
    """The model_versions row (a Row with the table's columns) or None."""
    return conn.execute(select(ModelVersion).where(ModelVersion.version == version)).first()


def register_base_model(conn: Connection, model: str, clip: str, clip_pretrained: str | None) -> str:
    """Model version 0 is the base model of the study; returns what happened."""
    existing = model_version(conn, 0)
    if existing is not None:
        if (existing.path, existing.clip_model, existing.clip_pretrained) == (model, clip, clip_pretrained):
            return "unchanged"
        has_iterations = conn.execute(select(func.count()).select_from(Iteration)).scalar_one()
        if has_iterations:
            raise StoreError(
                f"the store's base model is {existing.path} (CLIP {existing.clip_model}); "
                "it cannot change once an iteration has started"
            )
        conn.execute(
            update(ModelVersion)
            .where(ModelVersion.version == 0)
            .values(path=model, base_model=model, clip_model=clip, clip_pretrained=clip_pretrained)
        )
        return "updated"
    conn.execute(
        ModelVersion.__table__.insert().values(
            version=0,
            parent_version=None,
            iteration=None,
            path=model,
            base_model=model,
            clip_model=clip,
            clip_pretrained=clip_pretrained,
            created_at=utcnow(),
        )
    )
    return "registered"


def status(conn: Connection) -> dict:
    total = conn.execute(select(func.count()).select_from(Prompt)).scalar_one()
    counts = conn.execute(
        select(WorkItem.iteration, WorkItem.state, func.count()).group_by(WorkItem.iteration, WorkItem.state)
    ).all()
    by_iteration: dict[int, dict[str, int]] = {}
    for number, state, count in counts:
        by_iteration.setdefault(number, {})[state] = count
    iterations = []
    for it in conn.execute(select(Iteration).order_by(Iteration.number)).all():
        states = by_iteration.get(it.number, {})
        known = sum(states.values())
        iterations.append(
            {
                "iteration": it.number,
                "state": it.state,
                "preset": it.preset,
                "policy_version": it.policy_version,
                "prompts": total,
                "pending": states.get("pending", 0) + max(total - known, 0),
                "claimed": states.get("claimed", 0),
                "done": states.get("done", 0),
                "failed": states.get("failed", 0),
            }
        )
    versions = [
        {
            "version": v.version,
            "parent": v.parent_version,
            "iteration": v.iteration,
            "path": v.path,
            "weights_hash": v.weights_hash,
            "created_at": v.created_at.isoformat(timespec="seconds"),
        }
        for v in conn.execute(select(ModelVersion).order_by(ModelVersion.version)).all()
    ]
    # Live by its lease and, on this host, by its process: a stale or dead worker is never live.
    live = [w for w in work.worker_states(conn) if w["state"] == work.LIVE]
    return {"prompts": total, "iterations": iterations, "model_versions": versions, "live_workers": live}
