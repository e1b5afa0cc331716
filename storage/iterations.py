"""Iterations and their work items: what `csr generate` starts and finishes.

An iteration freezes its generation settings when it starts and gets one work
item per prompt (storage/work.py claims them, storage/workers.py records who
does). It is generated once no item is pending or claimed.
"""

from __future__ import annotations

import os

from sqlalchemy import Connection, Engine, func, insert, select, text, update
from sqlalchemy.exc import IntegrityError

from csr.storage.clock import utcnow
from csr.storage.errors import MissingModelVersion, OrderError
from csr.storage.hashing import json_digest
from csr.storage.infos import IterationInfo, row_as
from csr.storage.models import Image, Iteration, ModelVersion, Prompt, WorkItem

PENDING, CLAIMED, DONE, FAILED = "pending", "claimed", "done", "failed"

def config_hash(config: dict) -> str:
    return json_digest(config)

def get_iteration(conn: Connection, number: int) -> IterationInfo | None:
    return row_as(IterationInfo, conn.execute(select(Iteration).where(Iteration.number == number)).first())

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
        raise MissingModelVersion(number, number - 1)
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

def prompt_inputs(conn: Connection, prompt_ids: list[int]) -> dict[int, tuple[str, str, int, str]]:
    """prompt id -> (prompt text, image file path, image id, the image's sha256 at import)."""
    rows = conn.execute(
        select(Prompt.id, Prompt.text, Image.root, Image.rel_path, Image.id.label("image_id"), Image.sha256)
        .join(Image, Image.id == Prompt.image_id)
        .where(Prompt.id.in_(prompt_ids))
    ).all()
    return {r.id: (r.text, os.path.join(r.root, r.rel_path), r.image_id, r.sha256) for r in rows}
