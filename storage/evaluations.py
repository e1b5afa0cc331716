"""Store API for evaluations of model versions (CHAIR, POPE, recorded metrics).

An evaluation is identified by (model version, fingerprint); the fingerprint
hashes the benchmark, its settings and the data set, so the same evaluation run
twice finds its row and adds nothing.
"""

from __future__ import annotations

from sqlalchemy import Connection, insert, select

from csr.storage.clock import utcnow
from csr.storage.hashing import json_digest
from csr.storage.models import Evaluation


def evaluation_fingerprint(benchmark: str, settings: dict, dataset_hash: str) -> str:
    return json_digest({"benchmark": benchmark, "settings": settings, "dataset": dataset_hash}, compact=True)


def find_evaluation(conn: Connection, model_version: int, fingerprint: str) -> dict | None:
    row = conn.execute(
        select(Evaluation.__table__).where(
            Evaluation.model_version == model_version, Evaluation.fingerprint == fingerprint
        )
    ).first()
    return None if row is None else dict(row._mapping)


def record_evaluation(
    conn: Connection,
    *,
    model_version: int,
    benchmark: str,
    settings: dict,
    dataset_hash: str,
    metrics: dict,
    items: list | None,
    n_responses: int,
    chair_s: float | None = None,
    chair_i: float | None = None,
    mean_words: float | None = None,
) -> dict | None:
    """Store one evaluation; when the same evaluation of this version is
    already stored, write nothing and return the stored one's metrics."""
    fingerprint = evaluation_fingerprint(benchmark, settings, dataset_hash)
    stored = find_evaluation(conn, model_version, fingerprint)
    if stored is not None:
        return stored["metrics"]
    conn.execute(
        insert(Evaluation).values(
            model_version=model_version,
            benchmark=benchmark,
            fingerprint=fingerprint,
            dataset_hash=dataset_hash,
            settings=settings,
            metrics=metrics,
            items=items,
            n_responses=n_responses,
            chair_s=chair_s,
            chair_i=chair_i,
            mean_words=mean_words,
            created_at=utcnow(),
        )
    )
    return None
