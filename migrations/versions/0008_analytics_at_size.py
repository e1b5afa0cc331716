"""the store at a study's size: what `csr stats` reads, in indexes

Revision ID: 0008
Revises: 0007

At 13,000 prompts x 3 iterations `csr stats` read every candidate row (1.1 GB
with their token ids) to count the excluded ones, and every response row,
text included, to count words. `responses.word_count` holds each response's
words (runs of characters other than ASCII whitespace, as the analytics
`words()` macro counts them), written with the response and filled here for
the rows already stored; `ix_responses_figures` covers the per-iteration
response figures, and the partial index `ix_candidates_excluded` holds only
the excluded candidates (a few per cent of them).
"""

import re

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

_WORD = re.compile(r"[^ \t\n\x0b\x0c\r]+")
_BATCH = 5000


def upgrade() -> None:
    op.add_column("responses", sa.Column("word_count", sa.Integer(), nullable=True))
    connection = op.get_bind()
    last = 0
    while True:
        rows = connection.execute(sa.text(
            "SELECT id, text FROM responses WHERE id > :last ORDER BY id LIMIT :batch"
        ), {"last": last, "batch": _BATCH}).all()
        if not rows:
            break
        connection.execute(sa.text("UPDATE responses SET word_count = :words WHERE id = :id"),
                           [{"id": row_id, "words": len(_WORD.findall(text))} for row_id, text in rows])
        last = rows[-1][0]
    op.create_index("ix_responses_figures", "responses", ["iteration", "is_truncated", "word_count"])
    op.create_index("ix_candidates_excluded", "candidates", ["iteration", "exclusion_reason", "is_final"],
                    sqlite_where=sa.text("exclusion_reason IS NOT NULL"),
                    postgresql_where=sa.text("exclusion_reason IS NOT NULL"))


def downgrade() -> None:
    op.drop_index("ix_candidates_excluded", table_name="candidates")
    op.drop_index("ix_responses_figures", table_name="responses")
    with op.batch_alter_table("responses") as batch:
        batch.drop_column("word_count")
