"""Store API for search trees: one prompt's candidates are written together."""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache

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

    Rows are dicts with CANDIDATE_COLUMNS (finish_reason may be absent). The
    caller owns the transaction, so a tree lands whole or not at all.
    """
    if not rows:
        return 0
    marker = _MARKERS.get(conn.dialect.paramstyle)
    if marker is None:  # a driver with named or numeric placeholders: the general path
        values = [{"iteration": iteration, "prompt_id": prompt_id, "finish_reason": None, **row} for row in rows]
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
        )
        for row in rows
    ]
    conn.exec_driver_sql(_insert_sql(marker), params)
    return len(params)
