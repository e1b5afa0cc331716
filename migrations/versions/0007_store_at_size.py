"""the store at a study's size: the indexes the work queue needs

Revision ID: 0007
Revises: 0006

At 13,000 prompts a claim read every work item of its iteration (the
claim index has no id order, so the next pending items came out of a sort),
found pending items out of attempts by reading every pending row, and
`release_unheld`, called before every claim, scanned the whole table for one
worker's items. Three indexes make each of those a range lookup.
"""

from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_work_items_next", "work_items", ["iteration", "state", "id"])
    op.create_index("ix_work_items_attempts", "work_items", ["iteration", "state", "attempts"])
    op.create_index("ix_work_items_holder", "work_items", ["state", "worker_id"])


def downgrade() -> None:
    op.drop_index("ix_work_items_holder", table_name="work_items")
    op.drop_index("ix_work_items_attempts", table_name="work_items")
    op.drop_index("ix_work_items_next", table_name="work_items")
