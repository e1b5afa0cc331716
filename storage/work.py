"""The work queue: claims, leases and the tree written with its item.

A work item is one (iteration, prompt). Workers claim a batch of items with a
lease, heartbeat to extend it, and complete each item in the same transaction
that writes its search tree. A worker that dies simply stops extending its
leases; once they expire, any other worker may claim the items again. On
the same host a dead worker is recognised at once (its pid is gone), and its
items are taken back without waiting for the lease.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import Connection, Engine, func, select, text, update

from csr.storage.clock import utcnow
from csr.storage.iterations import CLAIMED, DONE, FAILED, PENDING
from csr.storage.models import Worker, WorkItem
from csr.storage.outages import MAX_MESSAGE
from csr.storage.processes import is_gone, this_host
from csr.storage.trees import Tree, insert_tree


@dataclass(frozen=True)
class Claim:
    work_item_id: int
    prompt_id: int
    attempts: int

_CLAIM_SQL = """
UPDATE work_items
SET state = 'claimed', worker_id = :worker, lease_expires_at = :expires,
    attempts = attempts + 1, updated_at = :now
WHERE id IN ({next_ids})
RETURNING id, prompt_id, attempts
"""

# PostgreSQL: SKIP LOCKED lets concurrent claimers pass each other's rows. Each
# state is its own index range in id order (a locking clause cannot stand on a
# UNION, so each branch locks its own rows); the first `limit` of the two are
# the first `limit` of the OR over both.
_CLAIM_SQL_POSTGRESQL = """
WITH pending AS (
    SELECT id FROM work_items
    WHERE iteration = :iteration AND state = 'pending' AND attempts < :max_attempts
    ORDER BY id LIMIT :limit
    FOR UPDATE SKIP LOCKED
),
abandoned AS (
    SELECT id FROM work_items
    WHERE iteration = :iteration AND state = 'claimed' AND lease_expires_at < :now AND attempts < :max_attempts
    ORDER BY id LIMIT :limit
    FOR UPDATE SKIP LOCKED
)
UPDATE work_items
SET state = 'claimed', worker_id = :worker, lease_expires_at = :expires,
    attempts = attempts + 1, updated_at = :now
WHERE id IN (
    SELECT id FROM (SELECT id FROM pending UNION ALL SELECT id FROM abandoned) AS both_states
    ORDER BY id LIMIT :limit
)
RETURNING id, prompt_id, attempts
"""

# SQLite: one OR over two states reads the whole iteration and sorts it. Here
# the pending branch reads ix_work_items_next in id order only as far as the
# limit, and the abandoned branch the few claimed rows whose lease ran out
# (ix_work_items_claim); the planner would otherwise take the attempts index
# and sort every pending row. Claims serialise on BEGIN IMMEDIATE.
_NEXT_IDS_SQLITE = """
    SELECT id FROM (
        SELECT id FROM (
            SELECT id FROM work_items INDEXED BY ix_work_items_next
            WHERE iteration = :iteration AND state = 'pending' AND attempts < :max_attempts
            ORDER BY id LIMIT :limit
        )
        UNION ALL
        SELECT id FROM (
            SELECT id FROM work_items INDEXED BY ix_work_items_claim
            WHERE iteration = :iteration AND state = 'claimed' AND lease_expires_at < :now
              AND attempts < :max_attempts
            ORDER BY id LIMIT :limit
        )
    )
    ORDER BY id
    LIMIT :limit
"""

def claim(
    engine: Engine, iteration: int, worker_id: int, limit: int, lease: timedelta, max_attempts: int
) -> list[Claim]:
    """Claim up to `limit` pending (or abandoned) work items for this worker."""
    with engine.begin() as conn:
        return claim_in(conn, iteration, worker_id, limit, lease, max_attempts)

def claim_in(
    conn: Connection, iteration: int, worker_id: int, limit: int, lease: timedelta, max_attempts: int
) -> list[Claim]:
    """`claim` inside the caller's transaction."""
    now = utcnow()
    sql = _CLAIM_SQL_POSTGRESQL if conn.dialect.name == "postgresql" else _CLAIM_SQL.format(
        next_ids=_NEXT_IDS_SQLITE)
    _reclaim_from_dead_local_workers(conn, iteration, now)
    _fail_abandoned_and_exhausted(conn, iteration, now, max_attempts)
    rows = conn.execute(
        text(sql),
        {
            "worker": worker_id,
            "expires": now + lease,
            "now": now,
            "iteration": iteration,
            "max_attempts": max_attempts,
            "limit": limit,
        },
    ).all()
    if not rows:
        _fail_pending_exhausted(conn, iteration, now, max_attempts)
    return sorted((Claim(r.id, r.prompt_id, r.attempts) for r in rows), key=lambda c: c.work_item_id)

def _reclaim_from_dead_local_workers(conn: Connection, iteration: int, now: datetime) -> int:
    """End the leases of workers on this host whose process is gone; returns how many items.

    The items stay claimed with an expired lease, so the attempt the dead
    worker used still counts and `_fail_abandoned_and_exhausted` sees them like any other
    abandoned item.
    """
    holders = conn.execute(
        select(Worker.id, Worker.host, Worker.pid, Worker.started_at)
        .where(Worker.host == this_host(), Worker.id.in_(
            select(WorkItem.worker_id).where(
                WorkItem.iteration == iteration, WorkItem.state == CLAIMED, WorkItem.lease_expires_at >= now
            )
        ))
    ).all()
    dead = [w.id for w in holders if is_gone(w.host, w.pid, w.started_at)]
    if not dead:
        return 0
    return conn.execute(
        update(WorkItem)
        .where(WorkItem.worker_id.in_(dead), WorkItem.state == CLAIMED)
        .values(lease_expires_at=now - timedelta(microseconds=1), updated_at=now)
    ).rowcount or 0

def _fail_abandoned_and_exhausted(conn: Connection, iteration: int, now, max_attempts: int) -> None:
    """Claimed items whose worker died after using `max_attempts` are failed, not retried forever."""
    conn.execute(
        update(WorkItem)
        .where(
            WorkItem.iteration == iteration,
            WorkItem.state == CLAIMED,
            WorkItem.lease_expires_at < now,
            WorkItem.attempts >= max_attempts,
        )
        .values(
            state=FAILED,
            worker_id=None,
            last_error=func.coalesce(WorkItem.last_error, "the worker holding it stopped responding"),
            updated_at=now,
        )
    )

def _fail_pending_exhausted(conn: Connection, iteration: int, now, max_attempts: int) -> None:
    """Pending items this run may not claim (left by a run with a higher --max-attempts) are
    failed once the claimable ones are gone, so the worker sees the iteration end.

    Only on an empty claim: before every claim, on PostgreSQL with statistics
    taken before the items turned pending, its plan walked every pending row."""
    conn.execute(
        update(WorkItem)
        .where(WorkItem.iteration == iteration, WorkItem.state == PENDING, WorkItem.attempts >= max_attempts)
        .values(
            state=FAILED,
            last_error=func.coalesce(WorkItem.last_error, "no attempts left"),
            updated_at=now,
        )
    )

def write_tree(engine: Engine, claim_: Claim, worker_id: int, iteration: int, tree: Tree) -> bool:
    """Write a prompt's whole tree and mark its item done, atomically.

    Returns False (and writes nothing) when this worker no longer holds the
    item: its lease expired and another worker took it over.
    """
    with engine.begin() as conn:
        held = conn.execute(
            update(WorkItem)
            .where(
                WorkItem.id == claim_.work_item_id,
                WorkItem.worker_id == worker_id,
                WorkItem.state == CLAIMED,
            )
            .values(state=DONE, worker_id=None, lease_expires_at=None, last_error=None, updated_at=utcnow())
        ).rowcount
        if held != 1:
            conn.rollback()
            return False
        insert_tree(conn, iteration, claim_.prompt_id, tree)
    return True

def fail(engine: Engine, claim_: Claim, worker_id: int, error: str, max_attempts: int) -> str:
    """Record a failed attempt; the item is retried until it has used max_attempts."""
    state = FAILED if claim_.attempts >= max_attempts else PENDING
    with engine.begin() as conn:
        conn.execute(
            update(WorkItem)
            .where(WorkItem.id == claim_.work_item_id, WorkItem.worker_id == worker_id)
            .values(
                state=state, worker_id=None, lease_expires_at=None, last_error=_one_line(error), updated_at=utcnow()
            )
        )
    return state

def _one_line(error: str) -> str:
    lines = error.strip().splitlines()
    line = lines[0] if lines else "unknown error"
    return line if len(line) <= MAX_MESSAGE else line[: MAX_MESSAGE - 3] + "..."

def release(engine: Engine, worker_id: int, claims: list[Claim]) -> None:
    """Give unfinished items back without counting the attempt (clean shutdown)."""
    ids = [c.work_item_id for c in claims]
    if not ids:
        return
    with engine.begin() as conn:
        conn.execute(
            update(WorkItem)
            .where(WorkItem.id.in_(ids), WorkItem.worker_id == worker_id, WorkItem.state == CLAIMED)
            .values(
                state=PENDING,
                worker_id=None,
                lease_expires_at=None,
                attempts=WorkItem.attempts - 1,
                updated_at=utcnow(),
            )
        )

def release_unheld(engine: Engine, worker_id: int) -> int:
    """Give back items claimed in this worker's name that it does not know it holds.

    Called between batches, when the worker holds nothing: a claim whose commit
    landed but whose answer was lost to a dropped connection leaves such items.
    """
    with engine.begin() as conn:
        return conn.execute(
            update(WorkItem)
            .where(WorkItem.worker_id == worker_id, WorkItem.state == CLAIMED)
            .values(
                state=PENDING,
                worker_id=None,
                lease_expires_at=None,
                attempts=WorkItem.attempts - 1,
                updated_at=utcnow(),
            )
        ).rowcount or 0
