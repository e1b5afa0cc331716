"""Iterations, work items, workers: the store side of `csr generate`.

A work item is one (iteration, prompt). Workers claim a batch of items with a
lease, heartbeat to extend it, and complete each item in the same transaction
that writes its search tree. A worker that dies simply stops extending its
leases; once they expire, any other worker may claim the items again.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import Connection, Engine, func, insert, select, text, update
from sqlalchemy.exc import IntegrityError

from csr.storage.clock import utcnow
from csr.storage.errors import OrderError
from csr.storage.models import Image, Iteration, ModelVersion, Prompt, Worker, WorkItem
from csr.storage.trees import Tree, insert_tree

PENDING, CLAIMED, DONE, FAILED = "pending", "claimed", "done", "failed"


def config_hash(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


def get_iteration(conn: Connection, number: int):
    return conn.execute(select(Iteration).where(Iteration.number == number)).first()


def start_iteration(engine: Engine, number: int, preset: str, config: dict) -> tuple[dict, bool]:
    """Create iteration `number` with its frozen config, or confirm an existing one.

    Returns (frozen config, created?). Refuses when the policy model version
    number-1 does not exist or when the iteration was started with other settings.
    Work items are (re)created for every prompt that has none, so prompts
    imported later join the iteration.
    """
    if number < 1:
        raise OrderError(f"iterations are numbered from 1 (got {number})")
    for attempt in range(3):
        try:
            with engine.begin() as conn:
                created = _start_iteration(conn, number, preset, config)
                _add_missing_work_items(conn, number)
                return get_iteration(conn, number).config, created
        except IntegrityError:
            # Another worker started the same iteration at the same moment: read theirs.
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


def _start_iteration(conn: Connection, number: int, preset: str, config: dict) -> bool:
    existing = get_iteration(conn, number)
    digest = config_hash(config)
    if existing is not None:
        if existing.config_hash != digest:
            differing = sorted(
                key
                for key in set(existing.config) | set(config)
                if existing.config.get(key) != config.get(key)
            )
            details = ", ".join(
                f"{k}: {existing.config.get(k)!r} (stored) vs {config.get(k)!r}" for k in differing
            )
            raise OrderError(
                f"iteration {number} was started with other settings ({details}); "
                "use the same settings or a new iteration"
            )
        return False
    policy = conn.execute(select(ModelVersion.version).where(ModelVersion.version == number - 1)).first()
    if policy is None:
        hint = "run `csr init`" if number == 1 else f"run `csr train --iter {number - 1}` first"
        raise OrderError(f"iteration {number} needs model version {number - 1}, which does not exist: {hint}")
    conn.execute(
        insert(Iteration).values(
            number=number,
            policy_version=number - 1,
            preset=preset,
            config=config,
            config_hash=digest,
            state="generating",
            created_at=utcnow(),
        )
    )
    return True


_ADD_WORK_ITEMS_SQL = """
INSERT INTO work_items (iteration, prompt_id, state, attempts, updated_at)
SELECT :iteration, p.id, 'pending', 0, :now FROM prompts p
WHERE NOT EXISTS (SELECT 1 FROM work_items w WHERE w.iteration = :iteration AND w.prompt_id = p.id)
ORDER BY p.id
"""


def _add_missing_work_items(conn: Connection, number: int) -> int:
    result = conn.execute(text(_ADD_WORK_ITEMS_SQL), {"iteration": number, "now": utcnow()})
    return result.rowcount or 0


def register_worker(engine: Engine, iteration: int, device: str) -> int:
    now = utcnow()
    with engine.begin() as conn:
        return conn.execute(
            insert(Worker)
            .values(
                iteration=iteration,
                host=socket.gethostname(),
                pid=os.getpid(),
                device=device,
                started_at=now,
                heartbeat_at=now,
            )
            .returning(Worker.id)
        ).scalar_one()


@dataclass(frozen=True)
class Claim:
    work_item_id: int
    prompt_id: int
    attempts: int


_CLAIM_SQL = """
UPDATE work_items
SET state = 'claimed', worker_id = :worker, lease_expires_at = :expires,
    attempts = attempts + 1, updated_at = :now
WHERE id IN (
    SELECT id FROM work_items
    WHERE iteration = :iteration
      AND (state = 'pending' OR (state = 'claimed' AND lease_expires_at < :now))
      AND attempts < :max_attempts
    ORDER BY id
    LIMIT :limit
    {lock}
)
RETURNING id, prompt_id, attempts
"""


def claim(
    engine: Engine, iteration: int, worker_id: int, limit: int, lease: timedelta, max_attempts: int
) -> list[Claim]:
    """Claim up to `limit` pending (or abandoned) work items for this worker."""
    now = utcnow()
    # PostgreSQL: SKIP LOCKED lets concurrent claimers pass each other's rows.
    # SQLite: the engine opens every transaction with BEGIN IMMEDIATE, so claims serialise.
    lock = "FOR UPDATE SKIP LOCKED" if engine.dialect.name == "postgresql" else ""
    with engine.begin() as conn:
        _fail_exhausted(conn, iteration, now, max_attempts)
        rows = conn.execute(
            text(_CLAIM_SQL.format(lock=lock)),
            {
                "worker": worker_id,
                "expires": now + lease,
                "now": now,
                "iteration": iteration,
                "max_attempts": max_attempts,
                "limit": limit,
            },
        ).all()
    return sorted((Claim(r.id, r.prompt_id, r.attempts) for r in rows), key=lambda c: c.work_item_id)


def _fail_exhausted(conn: Connection, iteration: int, now, max_attempts: int) -> None:
    """Items whose workers died `max_attempts` times are failed instead of retried forever."""
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


def heartbeat(engine: Engine, worker_id: int, lease: timedelta) -> None:
    now = utcnow()
    with engine.begin() as conn:
        conn.execute(update(Worker).where(Worker.id == worker_id).values(heartbeat_at=now))
        conn.execute(
            update(WorkItem)
            .where(WorkItem.worker_id == worker_id, WorkItem.state == CLAIMED)
            .values(lease_expires_at=now + lease)
        )


def complete(engine: Engine, claim_: Claim, worker_id: int, iteration: int, tree: Tree) -> bool:
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
            .values(state=state, worker_id=None, lease_expires_at=None, last_error=error[:2000], updated_at=utcnow())
        )
    return state


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


def stop_worker(engine: Engine, worker_id: int) -> None:
    with engine.begin() as conn:
        conn.execute(update(Worker).where(Worker.id == worker_id).values(stopped_at=utcnow()))


def progress(conn: Connection, iteration: int) -> dict[str, int]:
    rows = conn.execute(
        select(WorkItem.state, func.count()).where(WorkItem.iteration == iteration).group_by(WorkItem.state)
    ).all()
    counts = {PENDING: 0, CLAIMED: 0, DONE: 0, FAILED: 0}
    counts.update({state: n for state, n in rows})
    return counts


def finish_iteration_if_done(engine: Engine, iteration: int) -> bool:
    """Mark the iteration generated once no item is pending or claimed."""
    with engine.begin() as conn:
        counts = progress(conn, iteration)
        if counts[PENDING] or counts[CLAIMED]:
            return False
        conn.execute(
            update(Iteration)
            .where(Iteration.number == iteration, Iteration.state == "generating")
            .values(state="generated")
        )
    return True


def prompt_inputs(conn: Connection, prompt_ids: list[int]) -> dict[int, tuple[str, str, int]]:
    """prompt id -> (prompt text, image file path, image id)."""
    rows = conn.execute(
        select(Prompt.id, Prompt.text, Image.root, Image.rel_path, Image.id.label("image_id"))
        .join(Image, Image.id == Prompt.image_id)
        .where(Prompt.id.in_(prompt_ids))
    ).all()
    return {r.id: (r.text, os.path.join(r.root, r.rel_path), r.image_id) for r in rows}

