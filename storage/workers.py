"""Worker processes as the store records them: registered, beating, stopped,
and the state `csr status` shows (live, stale, gone)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import Connection, Engine, func, insert, select, update

from csr.storage.clock import utcnow
from csr.storage.iterations import CLAIMED
from csr.storage.models import Worker, WorkItem
from csr.storage.processes import is_gone, this_host


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

def heartbeat(engine: Engine, worker_id: int, lease: timedelta) -> None:
    now = utcnow()
    with engine.begin() as conn:
        conn.execute(update(Worker).where(Worker.id == worker_id).values(heartbeat_at=now))
        conn.execute(
            update(WorkItem)
            .where(WorkItem.worker_id == worker_id, WorkItem.state == CLAIMED)
            .values(lease_expires_at=now + lease)
        )

def stop_worker(engine: Engine, worker_id: int) -> None:
    with engine.begin() as conn:
        conn.execute(update(Worker).where(Worker.id == worker_id).values(stopped_at=utcnow()))

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
