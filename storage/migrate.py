"""Schema revisions of the store, applied and checked through Alembic."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, inspect

import csr.migrations
from csr.storage.errors import SchemaMismatch, StoreError

MIGRATIONS_DIR = Path(csr.migrations.__file__).parent


def _config() -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    return config


def head_revision() -> str:
    return ScriptDirectory.from_config(_config()).get_current_head()


def known_revisions() -> set[str]:
    return {rev.revision for rev in ScriptDirectory.from_config(_config()).walk_revisions()}


def schema_history() -> list[dict]:
    """The schema revisions this csr knows, oldest first (as a store goes through them)."""
    found = [{"revision": rev.revision, "down_revision": rev.down_revision, "message": (rev.doc or "").strip()}
             for rev in ScriptDirectory.from_config(_config()).walk_revisions()]
    return list(reversed(found))


def current_revision(engine: Engine) -> str | None:
    # A read: on SQLite a deferred transaction, so that opening a store never
    # waits for (or blocks) a writer's lock.
    with engine.connect().execution_options(sqlite_begin="DEFERRED") as connection:
        return MigrationContext.configure(connection).get_current_revision()


def upgrade(engine: Engine, revision: str = "head") -> tuple[str | None, str]:
    """Migrate the store to `revision`; returns (before, after)."""
    before = current_revision(engine)
    if before is not None and before not in known_revisions():
        raise SchemaMismatch(_newer_message(before), before, head_revision(), newer=True)
    config = _config()
    with engine.connect() as connection:
        # SQLite: a batch migration that recreates a table other tables reference
        # (copy, DROP, rename) fails while foreign keys are enforced. Switch them
        # off for the migration (outside the transaction, where the pragma works)
        # and check every reference before committing instead.
        raw = connection.connection.driver_connection if connection.dialect.name == "sqlite" else None
        if raw is not None:
            raw.execute("PRAGMA foreign_keys=OFF")
        try:
            with connection.begin():
                config.attributes["connection"] = connection
                command.upgrade(config, revision)
                if raw is not None:
                    broken = connection.exec_driver_sql("PRAGMA foreign_key_check").all()
                    if broken:
                        raise StoreError(
                            f"the upgrade to {revision} would leave {len(broken)} broken reference(s), "
                            f"first in table {broken[0][0]}; nothing was changed"
                        )
        finally:
            if raw is not None:
                raw.execute("PRAGMA foreign_keys=ON")
    return before, current_revision(engine)


def is_empty(engine: Engine) -> bool:
    return not inspect(engine).get_table_names()


def check_revision(engine: Engine) -> None:
    """Refuse to work on a store whose schema is not the one this code was written for."""
    current = current_revision(engine)
    head = head_revision()
    if current == head:
        return
    if current is None:
        raise SchemaMismatch("this database is not a csr store (no schema revision)", None, head)
    if current not in known_revisions():
        raise SchemaMismatch(_newer_message(current), current, head, newer=True)
    raise SchemaMismatch(f"the store is at schema revision {current}, this csr needs {head}", current, head)


def _newer_message(revision: str) -> str:
    return (
        f"the store is at schema revision {revision}, which this csr does not know "
        "(made by a newer csr): upgrade csr"
    )
