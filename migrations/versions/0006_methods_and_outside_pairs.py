"""iterations record their method; self-rewarding judgements; imported pair sets

Revision ID: 0006
Revises: 0005

An iteration makes its pairs by a method: `csr` (the calibrated search, every
iteration before this revision), `self-reward` (sampled responses judged by the
model with the paper's table 3 prompt; each verdict in `judgements` with the
judge's whole output) or `outside` (trained on an imported pair set). A pair
set records its source; an imported one belongs to no iteration (`iteration`
becomes nullable) and keeps its pairs in `outside_pairs`, with where they came
from in `origin`. Existing rows get method and source `csr`.
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "judgements",
        sa.Column("id", BigId, nullable=False),
        sa.Column("iteration", sa.Integer(), nullable=False),
        sa.Column("prompt_id", sa.Integer(), nullable=False),
        sa.Column("first_node", sa.Integer(), nullable=False),
        sa.Column("second_node", sa.Integer(), nullable=False),
        sa.Column("sample_seed", sa.BigInteger(), nullable=False),
        sa.Column("judge_prompt", sa.Text(), nullable=False),
        sa.Column("output", sa.Text(), nullable=False),
        sa.Column("output_token_ids", sa.JSON(), nullable=False),
        sa.Column("verdict", sa.Integer(), nullable=True),
        sa.Column("parse_error", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(["iteration"], ["iterations.number"]),
        sa.ForeignKeyConstraint(["prompt_id"], ["prompts.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("iteration", "prompt_id", "first_node", "second_node", name="uq_judgements_pair"),
    )
    op.create_table(
        "outside_pairs",
        sa.Column("id", BigId, nullable=False),
        sa.Column("pair_set_id", sa.Integer(), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("external_id", sa.String(length=255), nullable=True),
        sa.Column("image_id", sa.Integer(), nullable=False),
        sa.Column("prompt", sa.Text(), nullable=False),
        sa.Column("chosen_text", sa.Text(), nullable=False),
        sa.Column("rejected_text", sa.Text(), nullable=False),
        sa.ForeignKeyConstraint(["image_id"], ["images.id"]),
        sa.ForeignKeyConstraint(["pair_set_id"], ["pair_sets.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("pair_set_id", "position", name="uq_outside_pairs_position"),
    )
    with op.batch_alter_table("outside_pairs", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_outside_pairs_image_id"), ["image_id"], unique=False)

    with op.batch_alter_table("iterations", schema=None) as batch_op:
        batch_op.add_column(sa.Column("method", sa.String(length=32), server_default="csr", nullable=False))

    with op.batch_alter_table("pair_sets", schema=None) as batch_op:
        batch_op.add_column(sa.Column("source", sa.String(length=32), server_default="csr", nullable=False))
        batch_op.add_column(sa.Column("origin", sa.JSON(), nullable=True))
        batch_op.alter_column("iteration", existing_type=sa.Integer(), nullable=True)


def downgrade() -> None:
    # Imported pair sets have no iteration to go back to: they go, and what trained on them.
    bind = op.get_bind()
    bind.execute(sa.text("DELETE FROM outside_pairs"))
    bind.execute(sa.text("DELETE FROM pair_sets WHERE iteration IS NULL"))
    with op.batch_alter_table("pair_sets", schema=None) as batch_op:
        batch_op.alter_column("iteration", existing_type=sa.Integer(), nullable=False)
        batch_op.drop_column("origin")
        batch_op.drop_column("source")

    with op.batch_alter_table("iterations", schema=None) as batch_op:
        batch_op.drop_column("method")

    with op.batch_alter_table("outside_pairs", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_outside_pairs_image_id"))

    op.drop_table("outside_pairs")
    op.drop_table("judgements")
