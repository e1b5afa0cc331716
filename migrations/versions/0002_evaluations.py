"""evaluations table; candidates.finish_reason and a children index

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22 04:39:54.789377
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "evaluations",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("model_version", sa.Integer(), nullable=False),
        sa.Column("benchmark", sa.String(length=128), nullable=False),
        sa.Column("n_responses", sa.Integer(), nullable=False),
        sa.Column("chair_s", sa.Float(), nullable=False),
        sa.Column("chair_i", sa.Float(), nullable=False),
        sa.Column("mean_words", sa.Float(), nullable=False),
        sa.Column("details", sa.JSON(), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["model_version"],
            ["model_versions.version"],
        ),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("model_version", "benchmark"),
    )
    with op.batch_alter_table("candidates", schema=None) as batch_op:
        batch_op.add_column(sa.Column("finish_reason", sa.String(length=16), nullable=True))
        batch_op.create_index("ix_candidates_children", ["iteration", "prompt_id", "parent_node"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("candidates", schema=None) as batch_op:
        batch_op.drop_index("ix_candidates_children")
        batch_op.drop_column("finish_reason")
    op.drop_table("evaluations")
