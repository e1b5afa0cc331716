"""Store API for search trees: one prompt's candidates and final responses are
written together."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cache

from sqlalchemy import Connection, insert, select

from csr.storage.models import Candidate, Judgement, Response

# The columns a caller supplies for each candidate, in this order.
CANDIDATE_COLUMNS = (
    "node",
    "parent_node",
    "depth",
    "sibling_index",
    "text",
    "token_count",
    "logprob_sum",
    "r_t",
    "r_i",
    "reward",
    "cumulative_reward",
    "is_final",
    "is_kept",
    "exclusion_reason",
    "finish_reason",
    "token_ids",
    "beam_score",
    "text_rank",
    "image_rank",
    "text_exact",
)

# The columns a caller supplies for each final response.
RESPONSE_COLUMNS = (
    "leaf_node",
    "text",
    "token_ids",
    "token_count",
    "sentence_count",
    "logprob_sum",
    "r_t_sum",
    "r_i_sum",
    "text_rank_sum",
    "image_rank_sum",
    "is_truncated",
)


# A word is a run of characters other than ASCII whitespace: the count of the
# analytics `words()` macro, stored with each response (responses.word_count).
_WORD = re.compile(r"[^ \t\n\x0b\x0c\r]+")


def word_count(text: str) -> int:
    return len(_WORD.findall(text))


@dataclass
class Tree:
    """One (iteration, prompt) search tree as plain rows: CANDIDATE_COLUMNS
    dicts in node order and RESPONSE_COLUMNS dicts, one per final response;
    a self-rewarding tree also has its judge's verdicts (`judgements` rows)."""

    candidates: list[dict]
    responses: list[dict] = field(default_factory=list)
    judgements: list[dict] = field(default_factory=list)

# Positional placeholder of each DB-API paramstyle the fast path knows.
_MARKERS = {"qmark": "?", "format": "%s", "pyformat": "%s"}


@cache
def _insert_sql(marker: str) -> str:
    columns = ("iteration", "prompt_id", *CANDIDATE_COLUMNS)
    return (
        f"INSERT INTO {Candidate.__tablename__} ({', '.join(columns)}) "
        f"VALUES ({', '.join([marker] * len(columns))})"
    )


def insert_candidates(conn: Connection, iteration: int, prompt_id: int, rows: Sequence[dict]) -> int:
    """Insert every candidate of one (iteration, prompt) tree; returns how many.

    Rows are dicts with CANDIDATE_COLUMNS (finish_reason and the columns after
    it may be absent). The caller owns the transaction, so a tree lands whole
    or not at all.
    """
    if not rows:
        return 0
    marker = _MARKERS.get(conn.dialect.paramstyle)
    if marker is None:  # a driver with named or numeric placeholders: the general path
        optional = dict.fromkeys(CANDIDATE_COLUMNS[CANDIDATE_COLUMNS.index("finish_reason") :])
        values = [{"iteration": iteration, "prompt_id": prompt_id, **optional, **row} for row in rows]
        conn.execute(insert(Candidate), values)
        return len(values)
    # Workers write a tree of a few hundred rows per prompt, millions per
    # iteration: positional tuples straight to the driver's executemany cost
    # a fraction of SQLAlchemy's per-row dict processing. Values must be
    # plain Python types (bool, int, float, str, None), as the driver sees them.
    params = [
        (
            iteration,
            prompt_id,
            row["node"],
            row["parent_node"],
            row["depth"],
            row["sibling_index"],
            row["text"],
            row["token_count"],
            row["logprob_sum"],
            row["r_t"],
            row["r_i"],
            row["reward"],
            row["cumulative_reward"],
            row["is_final"],
            row["is_kept"],
            row["exclusion_reason"],
            row.get("finish_reason"),
            _json(row.get("token_ids")),
            row.get("beam_score"),
            row.get("text_rank"),
            row.get("image_rank"),
            row.get("text_exact"),
        )
        for row in rows
    ]
    conn.exec_driver_sql(_insert_sql(marker), params)
    return len(params)


def _json(value) -> str | None:
    # The driver sees a JSON column as text: serialise as SQLAlchemy's JSON type does.
    return None if value is None else json.dumps(value)


def insert_tree(conn: Connection, iteration: int, prompt_id: int, tree: Tree) -> int:
    """Insert a whole tree, candidates then responses; returns the candidate count.
    The caller owns the transaction."""
    written = insert_candidates(conn, iteration, prompt_id, tree.candidates)
    if tree.responses:
        ids = dict(
            conn.execute(
                select(Candidate.node, Candidate.id).where(
                    Candidate.iteration == iteration, Candidate.prompt_id == prompt_id
                )
            ).all()
        )
        conn.execute(
            insert(Response),
            [
                {
                    "iteration": iteration,
                    "prompt_id": prompt_id,
                    "leaf_candidate_id": ids[row["leaf_node"]],
                    "has_token_ids": row["token_ids"] is not None,
                    "word_count": word_count(row["text"]),
                    **{column: row[column] for column in RESPONSE_COLUMNS},
                }
                for row in tree.responses
            ],
        )
    if tree.judgements:
        conn.execute(insert(Judgement), [{"iteration": iteration, "prompt_id": prompt_id, **row}
                                         for row in tree.judgements])
    return written
