"""Store API for search trees: one prompt's candidates are written together."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import Connection, insert

from csr.storage.models import Candidate

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
)


def insert_candidates(conn: Connection, iteration: int, prompt_id: int, rows: Sequence[dict]) -> int:
    """Insert every candidate of one (iteration, prompt) tree; returns how many.

    Rows are dicts with CANDIDATE_COLUMNS (finish_reason may be absent). The
    caller owns the transaction, so a tree lands whole or not at all.
    """
    if not rows:
        return 0
    values = [
        {"iteration": iteration, "prompt_id": prompt_id, "finish_reason": None, **row} for row in rows
    ]
    conn.execute(insert(Candidate), values)
    return len(values)
