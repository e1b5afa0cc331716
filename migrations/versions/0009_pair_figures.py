"""the store at a study's size: a pair's figures without reading a response row

Revision ID: 0009
Revises: 0008

`csr stats` and the report look up both responses of every default-set pair
(39,000 pairs, 78,000 lookups at 13,000 prompts x 3 iterations). Each lookup
read the response row, its text and token ids included, for five numbers and
to compare the pair's text with the response's (for its word count).
`ix_responses_pair_figures` covers those numbers, and `pairs.chosen_words` /
`pairs.rejected_words` hold each pair text's words (runs of characters other
than ASCII whitespace, as responses.word_count), written with the pair and
counted here for the pairs already stored.
"""

import re

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

_WORD = re.compile(r"[^ \t\n\x0b\x0c\r]+")
_BATCH = 5000


def upgrade() -> None:
    op.add_column("pairs", sa.Column("chosen_words", sa.Integer(), nullable=True))
    op.add_column("pairs", sa.Column("rejected_words", sa.Integer(), nullable=True))
    connection = op.get_bind()
    last = 0
    while True:
        rows = connection.execute(sa.text(
            "SELECT id, chosen_text, rejected_text FROM pairs WHERE id > :last ORDER BY id LIMIT :batch"
        ), {"last": last, "batch": _BATCH}).all()
        if not rows:
            break
        connection.execute(
            sa.text("UPDATE pairs SET chosen_words = :chosen, rejected_words = :rejected WHERE id = :id"),
            [{"id": row_id, "chosen": len(_WORD.findall(chosen)), "rejected": len(_WORD.findall(rejected))}
             for row_id, chosen, rejected in rows])
        last = rows[-1][0]
    op.create_index("ix_responses_pair_figures", "responses",
                    ["leaf_candidate_id", "sentence_count", "r_t_sum", "r_i_sum", "token_count", "word_count"])


def downgrade() -> None:
    op.drop_index("ix_responses_pair_figures", table_name="responses")
    with op.batch_alter_table("pairs") as batch:
        batch.drop_column("rejected_words")
        batch.drop_column("chosen_words")
