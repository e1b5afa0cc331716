"""evaluations: any benchmark, keyed by settings and data set, with per-item answers

Revision ID: 0004
Revises: 0003

POPE rows have no CHAIR figures, so chair_s, chair_i and mean_words become
nullable. An evaluation is identified by its model version and a fingerprint
of (benchmark, settings, data set hash): rerunning the same evaluation finds
its row, and the same benchmark under other settings is another row. Rows made
before this revision get a fingerprint of their benchmark name (unique per
version, as the old constraint made it) and their CHAIR figures as metrics.
"""

import hashlib
import json

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

# 0002 created the unique constraint without a name: PostgreSQL named it, SQLite
# did not, so batch mode finds it on SQLite through this naming convention.
_OLD_UNIQUE = "evaluations_model_version_benchmark_key"
_SQLITE_NAMING = {"uq": "%(table_name)s_%(column_0_name)s_%(column_1_name)s_key"}


def legacy_fingerprint(benchmark: str) -> str:
    return hashlib.sha256(f"legacy evaluation|{benchmark}".encode()).hexdigest()


def upgrade() -> None:
    with op.batch_alter_table("evaluations", schema=None, naming_convention=_SQLITE_NAMING) as batch_op:
        batch_op.add_column(sa.Column("fingerprint", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("dataset_hash", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("settings", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("metrics", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("items", sa.JSON(), nullable=True))

    evaluations = sa.table(
        "evaluations",
        sa.column("id", sa.Integer()),
        sa.column("benchmark", sa.String()),
        sa.column("n_responses", sa.Integer()),
        sa.column("chair_s", sa.Float()),
        sa.column("chair_i", sa.Float()),
        sa.column("mean_words", sa.Float()),
        sa.column("details", sa.JSON()),
        sa.column("fingerprint", sa.String()),
        sa.column("metrics", sa.JSON()),
    )
    bind = op.get_bind()
    rows = [] if op.get_context().as_sql else bind.execute(sa.select(evaluations)).mappings().all()
    for row in rows:
        metrics = {"chair_s": row["chair_s"], "chair_i": row["chair_i"], "mean_words": row["mean_words"],
                   "n_responses": row["n_responses"]}
        details = row["details"] if isinstance(row["details"], dict) else {}
        if "recall" in details:
            metrics["recall"] = details["recall"]
        bind.execute(
            evaluations.update()
            .where(evaluations.c.id == row["id"])
            .values(fingerprint=legacy_fingerprint(row["benchmark"]), metrics=json.loads(json.dumps(metrics)))
        )

    with op.batch_alter_table("evaluations", schema=None, naming_convention=_SQLITE_NAMING) as batch_op:
        batch_op.alter_column("fingerprint", existing_type=sa.String(length=64), nullable=False)
        batch_op.alter_column("chair_s", existing_type=sa.Float(), nullable=True)
        batch_op.alter_column("chair_i", existing_type=sa.Float(), nullable=True)
        batch_op.alter_column("mean_words", existing_type=sa.Float(), nullable=True)
        batch_op.drop_constraint(_OLD_UNIQUE, type_="unique")
        batch_op.create_unique_constraint("uq_evaluations_version_fingerprint", ["model_version", "fingerprint"])


def downgrade() -> None:
    # Only CHAIR rows fit the old table, one per (version, benchmark): others go.
    bind = op.get_bind()
    bind.execute(sa.text("DELETE FROM evaluations WHERE chair_s IS NULL OR chair_i IS NULL OR mean_words IS NULL"))
    bind.execute(sa.text(
        "DELETE FROM evaluations WHERE id NOT IN "
        "(SELECT MAX(id) FROM evaluations GROUP BY model_version, benchmark)"
    ))
    with op.batch_alter_table("evaluations", schema=None, naming_convention=_SQLITE_NAMING) as batch_op:
        batch_op.drop_constraint("uq_evaluations_version_fingerprint", type_="unique")
        batch_op.create_unique_constraint(_OLD_UNIQUE, ["model_version", "benchmark"])
        batch_op.alter_column("mean_words", existing_type=sa.Float(), nullable=False)
        batch_op.alter_column("chair_i", existing_type=sa.Float(), nullable=False)
        batch_op.alter_column("chair_s", existing_type=sa.Float(), nullable=False)
        batch_op.drop_column("items")
        batch_op.drop_column("metrics")
        batch_op.drop_column("settings")
        batch_op.drop_column("dataset_hash")
        batch_op.drop_column("fingerprint")
