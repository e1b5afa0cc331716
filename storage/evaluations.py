"""Store API for hallucination evaluations of model versions."""

from __future__ import annotations

from sqlalchemy import Connection, delete, insert, select

from csr.storage.clock import utcnow
from csr.storage.models import Evaluation


def record_evaluation(
    conn: Connection,
    *,
    model_version: int,
    benchmark: str,
    n_responses: int,
    chair_s: float,
    chair_i: float,
    mean_words: float,
    details: dict | None = None,
) -> None:
    """Store (or replace) the evaluation of one model version on one benchmark."""
    conn.execute(
        delete(Evaluation).where(Evaluation.model_version == model_version, Evaluation.benchmark == benchmark)
    )
    conn.execute(
        insert(Evaluation).values(
            model_version=model_version,
            benchmark=benchmark,
            n_responses=n_responses,
            chair_s=chair_s,
            chair_i=chair_i,
            mean_words=mean_words,
            details=details,
            created_at=utcnow(),
        )
    )


def evaluations(conn: Connection, benchmark: str | None = None) -> list[dict]:
    query = select(Evaluation).order_by(Evaluation.benchmark, Evaluation.model_version)
    if benchmark:
        query = query.where(Evaluation.benchmark == benchmark)
    return [dict(row._mapping) for row in conn.execute(query).all()]
