"""Store API for training runs and the model versions they produce."""

from __future__ import annotations

from sqlalchemy import Connection, delete, insert, select, update

from csr.storage.clock import utcnow
from csr.storage.errors import StoreError
from csr.storage.infos import VersionInfo, row_as
from csr.storage.models import Iteration, ModelVersion, PairSet, TrainingRun


def find_resumable_run(conn: Connection, iteration: int, pairs_hash: str, hyperparams: dict):
    """An unfinished run of the same iteration, pairs and settings, to continue."""
    for run in conn.execute(
        select(TrainingRun)
        .where(TrainingRun.iteration == iteration, TrainingRun.state.in_(("running", "failed")))
        .order_by(TrainingRun.id.desc())
    ).all():
        if run.pairs_hash == pairs_hash and run.hyperparams == hyperparams:
            return run
    return None


def start_training_run(
    conn: Connection,
    iteration: int,
    pair_set_id: int,
    selection_sql: str,
    pairs_hash: str,
    hyperparams: dict,
    checkpoint_dir: str,
) -> int:
    return conn.execute(
        insert(TrainingRun)
        .values(
            iteration=iteration,
            pair_set_id=pair_set_id,
            selection_sql=selection_sql,
            pairs_hash=pairs_hash,
            hyperparams=hyperparams,
            state="running",
            checkpoint_dir=checkpoint_dir,
            started_at=utcnow(),
        )
        .returning(TrainingRun.id)
    ).scalar_one()


def begin_training_run(conn: Connection, iteration: int, pair_set_id: int, selection_sql: str, pairs_hash: str,
                       hyperparams: dict, checkpoint_dir: str) -> int:
    """The run to train with: an unfinished one of the same pairs and settings,
    marked running again (it resumes from its checkpoint), or a new one."""
    run = find_resumable_run(conn, iteration, pairs_hash, hyperparams)
    if run is None:
        return start_training_run(conn, iteration, pair_set_id, selection_sql, pairs_hash, hyperparams, checkpoint_dir)
    mark_run(conn, run.id, "running")
    return run.id


def mark_run(conn: Connection, run_id: int, state: str, metrics: list | None = None) -> None:
    values = {"state": state}
    if metrics is not None:
        values["metrics"] = metrics
    if state != "running":
        values["finished_at"] = utcnow()
    conn.execute(update(TrainingRun).where(TrainingRun.id == run_id).values(**values))


def register_version(
    conn: Connection,
    *,
    version: int,
    parent: int,
    iteration: int,
    path: str,
    weights_hash: str,
    lora_config: dict,
    metrics: dict,
    run_id: int,
    run_metrics: list | None = None,
    replace: bool = False,
) -> None:
    """Record model version `version` and finish run `run_id` (with its per-step metrics) in one transaction."""
    parent_row = conn.execute(select(ModelVersion).where(ModelVersion.version == parent)).one()
    if replace:
        conn.execute(update(TrainingRun).where(TrainingRun.output_version == version).values(output_version=None))
        conn.execute(delete(ModelVersion).where(ModelVersion.version == version))
    conn.execute(
        insert(ModelVersion).values(
            version=version,
            parent_version=parent,
            iteration=iteration,
            path=path,
            base_model=parent_row.base_model,
            clip_model=parent_row.clip_model,
            clip_pretrained=parent_row.clip_pretrained,
            weights_hash=weights_hash,
            lora_config=lora_config,
            metrics=metrics,
            created_at=utcnow(),
        )
    )
    conn.execute(
        update(TrainingRun)
        .where(TrainingRun.id == run_id)
        .values(state="done", output_version=version, finished_at=utcnow(),
                **({"metrics": run_metrics} if run_metrics is not None else {}))
    )
    conn.execute(update(Iteration).where(Iteration.number == iteration).values(state="trained"))


def lineage(conn: Connection, version: int) -> list[dict]:
    """The provenance chain of a model version, newest first, back to the base model."""
    chain = []
    current: int | None = version
    while current is not None:
        mv = conn.execute(select(ModelVersion).where(ModelVersion.version == current)).first()
        if mv is None:
            break
        entry = {
            "version": mv.version,
            "path": mv.path,
            "weights_hash": mv.weights_hash,
            "parent_version": mv.parent_version,
            "base_model": mv.base_model,
            "clip": mv.clip_model,
            "clip_pretrained": mv.clip_pretrained,
            "created_at": mv.created_at.isoformat(timespec="seconds"),
            # what training recorded: final loss, seconds, pairs, the reference pass actually used
            "metrics": mv.metrics,
        }
        run = conn.execute(
            select(TrainingRun).where(TrainingRun.output_version == mv.version).order_by(TrainingRun.id.desc())
        ).first()
        if run is not None:
            ps = conn.execute(select(PairSet).where(PairSet.id == run.pair_set_id)).one()
            it = conn.execute(select(Iteration).where(Iteration.number == run.iteration)).one()
            entry["training_run"] = {
                "id": run.id,
                "iteration": run.iteration,
                "hyperparams": run.hyperparams,
                "selection_sql": run.selection_sql,
                "pairs_hash": run.pairs_hash,
                "final_metrics": (run.metrics or [{}])[-1] if run.metrics else None,
            }
            entry["pair_set"] = {
                "id": ps.id,
                "name": ps.name,
                "preset": ps.preset,
                "params": ps.params,
                "result_hash": ps.result_hash,
                "selection_sql": ps.selection_sql,
                "source": ps.source,
                "origin": ps.origin,
            }
            entry["generation"] = {
                "iteration": it.number,
                "policy_version": it.policy_version,
                "preset": it.preset,
                "method": it.method,
                "config": it.config,
                "config_hash": it.config_hash,
            }
        chain.append(entry)
        current = mv.parent_version
    return chain


def model_version(conn: Connection, version: int) -> VersionInfo | None:
    return row_as(VersionInfo, conn.execute(select(ModelVersion).where(ModelVersion.version == version)).first())


class BaseModelMismatch(StoreError):
    """The store's model version 0 is another model than the one asked for."""

    def __init__(self, registered: str):
        self.registered = registered  # the store's base model, described
        super().__init__(f"this store's base model is {registered}; a study's base model never changes")


def describe_base_model(model: str, clip: str, clip_pretrained: str | None) -> str:
    tag = f", pretrained {clip_pretrained}" if clip_pretrained else ""
    return f"{model} (CLIP {clip}{tag})"


def register_base_model(conn: Connection, model: str, clip: str, clip_pretrained: str | None) -> str:
    """Model version 0 is the base model of the study; returns what happened.

    Once registered it never changes: every tree, pair and version of the
    store descends from it, so another model is another study (another store)."""
    existing = model_version(conn, 0)
    if existing is not None:
        if (existing.path, existing.clip_model, existing.clip_pretrained) == (model, clip, clip_pretrained):
            return "unchanged"
        raise BaseModelMismatch(describe_base_model(existing.path, existing.clip_model, existing.clip_pretrained))
    conn.execute(
        ModelVersion.__table__.insert().values(
            version=0,
            parent_version=None,
            iteration=None,
            path=model,
            base_model=model,
            clip_model=clip,
            clip_pretrained=clip_pretrained,
            created_at=utcnow(),
        )
    )
    return "registered"
