"""Iterations, work items, workers: the store side of `csr generate`.

A work item is one (iteration, prompt). Workers claim a batch of items with a
lease, heartbeat to extend it, and complete each item in the same transaction
that writes its search tree. A worker that dies simply stops extending its
leases; once they expire, any other worker may claim the items again. On
the same host a dead worker is recognised at once (its pid is gone), and its
items are taken back without waiting for the lease.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import Connection, Engine, func, insert, select, text, update
from sqlalchemy.exc import IntegrityError

from csr.storage.clock import utcnow
from csr.storage.errors import OrderError
from csr.storage.hashing import json_digest
from csr.storage.models import Image, Iteration, ModelVersion, Prompt, Worker, WorkItem
from csr.storage.outages import MAX_MESSAGE
from csr.storage.processes import is_gone, this_host
from csr.storage.trees import Tree, insert_tree

PENDING, CLAIMED, DONE, FAILED = "pending", "claimed", "done", "failed"


def config_hash(config: dict) -> str:
    return json_digest(config)


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
            method=config.get("method", "csr"),
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
                host=this_host(),
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
    now = utcnow()
    sql = _CLAIM_SQL_POSTGRESQL if engine.dialect.name == "postgresql" else _CLAIM_SQL.format(next_ids=_NEXT_IDS_SQLITE)
    with engine.begin() as conn:
        _reclaim_from_dead_local_workers(conn, iteration, now)
        _fail_exhausted(conn, iteration, now, max_attempts)
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
    return sorted((Claim(r.id, r.prompt_id, r.attempts) for r in rows), key=lambda c: c.work_item_id)


def _reclaim_from_dead_local_workers(conn: Connection, iteration: int, now: datetime) -> int:
    """End the leases of workers on this host whose process is gone; returns how many items.

    The items stay claimed with an expired lease, so the attempt the dead
    worker used still counts and `_fail_exhausted` sees them like any other
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


def _fail_exhausted(conn: Connection, iteration: int, now, max_attempts: int) -> None:
    """Items that used `max_attempts` are failed instead of retried forever: claimed ones
    whose worker died, and pending ones left over from a run with a higher --max-attempts."""
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
    conn.execute(
        update(WorkItem)
        .where(WorkItem.iteration == iteration, WorkItem.state == PENDING, WorkItem.attempts >= max_attempts)
        .values(
            state=FAILED,
            last_error=func.coalesce(WorkItem.last_error, "no attempts left"),
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


def prompt_inputs(conn: Connection, prompt_ids: list[int]) -> dict[int, tuple[str, str, int, str]]:
    """prompt id -> (prompt text, image file path, image id, the image's sha256 at import)."""
    rows = conn.execute(
        select(Prompt.id, Prompt.text, Image.root, Image.rel_path, Image.id.label("image_id"), Image.sha256)
        .join(Image, Image.id == Prompt.image_id)
        .where(Prompt.id.in_(prompt_ids))
    ).all()
    return {r.id: (r.text, os.path.join(r.root, r.rel_path), r.image_id, r.sha256) for r in rows}



@dataclass(frozen=True)
class Holder:
    """Another worker's hold on unfinished items of an iteration."""

    worker_id: int
    host: str
    pid: int
    prompts: int
    lease_expires_at: datetime  # the latest of its leases

    def describe(self) -> str:
        return (
            f"worker {self.worker_id} (host {self.host}, pid {self.pid}) holds {self.prompts} prompt(s) "
            f"until {self.lease_expires_at.isoformat(sep=' ', timespec='seconds')} UTC"
        )


def holders(conn: Connection, iteration: int, exclude_worker: int | None = None) -> list[Holder]:
    """Workers holding claimed items of the iteration (leases live or not), most prompts first."""
    query = (
        select(Worker.id, Worker.host, Worker.pid, func.count(), func.max(WorkItem.lease_expires_at))
        .select_from(WorkItem)
        .join(Worker, Worker.id == WorkItem.worker_id)
        .where(WorkItem.iteration == iteration, WorkItem.state == CLAIMED)
        .group_by(Worker.id, Worker.host, Worker.pid)
        .order_by(Worker.id)
    )
    if exclude_worker is not None:
        query = query.where(WorkItem.worker_id != exclude_worker)
    return [Holder(*row) for row in conn.execute(query).all()]


def retry_failed(engine: Engine, iteration: int) -> int:
    """Put the iteration's failed items back to pending with their attempts reset."""
    with engine.begin() as conn:
        return conn.execute(
            update(WorkItem)
            .where(WorkItem.iteration == iteration, WorkItem.state == FAILED)
            .values(state=PENDING, attempts=0, worker_id=None, lease_expires_at=None, updated_at=utcnow())
        ).rowcount or 0


def failed_items(conn: Connection, limit: int | None = None) -> list[dict]:
    """Failed prompts with the error that failed them, newest iteration first."""
    query = (
        select(WorkItem.iteration, Prompt.id, Prompt.external_id, WorkItem.attempts, WorkItem.last_error)
        .join(Prompt, Prompt.id == WorkItem.prompt_id)
        .where(WorkItem.state == FAILED)
        .order_by(WorkItem.iteration.desc(), Prompt.id)
        .limit(limit)
    )
    return [
        {"iteration": it, "prompt_id": pid, "prompt": ext, "attempts": attempts, "error": error}
        for it, pid, ext, attempts, error in conn.execute(query).all()
    ]


LIVE, STALE, GONE, STOPPED = "live", "stale", "gone", "stopped"

# A worker holding no items shows no lease to judge it by: without a heartbeat
# for this long it is shown as stale.
IDLE_WORKER_WINDOW = timedelta(seconds=90)


def worker_states(conn: Connection, include_stopped: bool = False) -> list[dict]:
    """Every worker not recorded as stopped, with its state.

    - gone: on this host, its process has ended (or its pid belongs to another process now);
    - stale: its heartbeat is older than its lease (leases are extended at each
      heartbeat to heartbeat + lease, so a worker past its leases missed them all);
    - live: otherwise.
    """
    now = utcnow()
    held = {
        worker: (count, lease_end)
        for worker, count, lease_end in conn.execute(
            select(WorkItem.worker_id, func.count(), func.max(WorkItem.lease_expires_at))
            .where(WorkItem.state == CLAIMED, WorkItem.worker_id.is_not(None))
            .group_by(WorkItem.worker_id)
        ).all()
    }
    query = select(Worker).order_by(Worker.id)
    if not include_stopped:
        query = query.where(Worker.stopped_at.is_(None))
    result = []
    for w in conn.execute(query).all():
        prompts, lease_end = held.get(w.id, (0, None))
        if w.stopped_at is not None:
            state = STOPPED
        elif is_gone(w.host, w.pid, w.started_at):
            state = GONE
        else:
            if lease_end is not None:
                state = STALE if lease_end < now else LIVE
            else:
                state = STALE if w.heartbeat_at < now - IDLE_WORKER_WINDOW else LIVE
        result.append(
            {
                "id": w.id,
                "iteration": w.iteration,
                "host": w.host,
                "pid": w.pid,
                "device": w.device,
                "state": state,
                "prompts_held": int(prompts),
                "heartbeat_at": w.heartbeat_at.isoformat(timespec="seconds"),
                "lease_expires_at": lease_end.isoformat(timespec="seconds") if lease_end else None,
            }
        )
    return result
