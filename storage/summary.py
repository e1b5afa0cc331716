"""`csr status`: prompts, iterations and their queue, model versions, live workers."""

from __future__ import annotations

from sqlalchemy import Connection, func, select

from csr.storage import workers
from csr.storage.iterations import failed_items
from csr.storage.models import Iteration, ModelVersion, Prompt, WorkItem


def status(conn: Connection) -> dict:
    total = conn.execute(select(func.count()).select_from(Prompt)).scalar_one()
    counts = conn.execute(
        select(WorkItem.iteration, WorkItem.state, func.count()).group_by(WorkItem.iteration, WorkItem.state)
    ).all()
    by_iteration: dict[int, dict[str, int]] = {}
    for number, state, count in counts:
        by_iteration.setdefault(number, {})[state] = count
    iterations = []
    for it in conn.execute(select(Iteration).order_by(Iteration.number)).all():
        states = by_iteration.get(it.number, {})
        known = sum(states.values())
        iterations.append(
            {
                "iteration": it.number,
                "state": it.state,
                "preset": it.preset,
                "policy_version": it.policy_version,
                "prompts": total,
                "pending": states.get("pending", 0) + max(total - known, 0),
                "claimed": states.get("claimed", 0),
                "done": states.get("done", 0),
                "failed": states.get("failed", 0),
            }
        )
    versions = [
        {
            "version": v.version,
            "parent": v.parent_version,
            "iteration": v.iteration,
            "path": v.path,
            "weights_hash": v.weights_hash,
            "created_at": v.created_at.isoformat(timespec="seconds"),
        }
        for v in conn.execute(select(ModelVersion).order_by(ModelVersion.version)).all()
    ]
    # Live by its lease and, on this host, by its process: a stale or dead worker is never live.
    states = workers.worker_states(conn)
    live = [w for w in states if w["state"] == workers.LIVE]
    return {"prompts": total, "iterations": iterations, "model_versions": versions, "live_workers": live,
            "workers": states, "failed_prompts": failed_items(conn)}
