"""Freeze the schema of a released revision as test assets.

    python -m tests.assets.freeze_schema 0002

writes tests/assets/schema_0002_sqlite.sql (the DDL that `alembic upgrade 0002`
leaves in sqlite_master) and tests/assets/schema_0002_postgresql.sql (the SQL
alembic emits for PostgreSQL up to 0002, offline mode). Once written, an asset
never changes: tests/test_migrations.py checks that the migrations still
produce it, and upgrades a store built from it (with data) to head.
"""

from __future__ import annotations

import io
import sys
import tempfile
from pathlib import Path

ASSETS = Path(__file__).parent


def asset_path(revision: str, backend: str) -> Path:
    return ASSETS / f"schema_{revision}_{backend}.sql"


def frozen_revisions() -> list[str]:
    return sorted(p.name.split("_")[1] for p in ASSETS.glob("schema_*_sqlite.sql"))


def sqlite_master_ddl(url: str) -> str:
    """Every CREATE statement of an SQLite database, in creation order."""
    from sqlalchemy import create_engine, text

    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(text("SELECT sql FROM sqlite_master WHERE sql IS NOT NULL ORDER BY rowid"))
            return "".join(f"{sql};\n\n" for (sql,) in rows)
    finally:
        engine.dispose()


def sqlite_ddl(revision: str) -> str:
    """Migrate a new SQLite file to `revision` with the real migrations; its DDL."""
    from csr.storage import migrate
    from csr.storage.db import make_engine

    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{Path(tmp) / 'frozen.db'}"
        engine = make_engine(url)
        try:
            migrate.upgrade(engine, revision)
        finally:
            engine.dispose()
        return sqlite_master_ddl(url)


def postgresql_ddl(revision: str) -> str:
    """The SQL the migrations emit for PostgreSQL from nothing up to `revision`
    (alembic offline mode: no server needed), including the alembic_version row."""
    from alembic.runtime.environment import EnvironmentContext
    from alembic.script import ScriptDirectory

    from csr.storage import migrate

    config = migrate._config()
    script = ScriptDirectory.from_config(config)
    buffer = io.StringIO()

    def upgrade_steps(rev, context):
        return script._upgrade_revs(revision, rev)

    with EnvironmentContext(
        config, script, fn=upgrade_steps, as_sql=True, starting_rev=None, destination_rev=revision
    ) as env:
        env.configure(dialect_name="postgresql", output_buffer=buffer, transactional_ddl=True)
        with env.begin_transaction():
            env.run_migrations()
    return buffer.getvalue()


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    revision = argv[0]
    for backend, ddl in (("sqlite", sqlite_ddl), ("postgresql", postgresql_ddl)):
        path = asset_path(revision, backend)
        if path.exists():
            print(f"{path} exists; a released schema is frozen for good", file=sys.stderr)
            return 1
        path.write_text(ddl(revision))
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
