"""candidates.text_exact: whether a candidate's text is its exact increment

A byte-fallback decode can rewrite text a parent already stored (a clean byte
run turned invalid by the next candidate's bytes); the child's text is then
only approximate, and says so. Rows made before this revision hold NULL
(unknown): their response texts are the joined candidate texts of revision
0003, not always the decode of their ids.

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("candidates", schema=None) as batch_op:
        batch_op.add_column(sa.Column("text_exact", sa.Boolean(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("candidates", schema=None) as batch_op:
        batch_op.drop_column("text_exact")
