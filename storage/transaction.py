"""One transaction on a csr store, with every part of the store's API.

`Store.read()` and `Store.write()` hand one out; callers never see the
connection. Rows come back as frozen dataclasses or plain dicts, never as
SQLAlchemy rows, so nothing outside storage/ depends on the schema's classes.
A read transaction refuses the write methods: on SQLite a deferred read that
starts writing can deadlock with a worker's immediate transaction.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any

from sqlalchemy import Connection

from csr.storage import (
    curation,
    evaluations,
    iterations,
    outside_pairs,
    prompts,
    self_reward_curation,
    summary,
    versions,
    workers,
)
from csr.storage.errors import StoreError


@dataclass(frozen=True)
class VersionInfo:
    """A model version: the base model (0) or the one trained on iteration `iteration`."""

    version: int
    parent_version: int | None
    iteration: int | None
    path: str
    base_model: str
    clip_model: str
    clip_pretrained: str | None
    weights_hash: str | None
    lora_config: dict | None
    metrics: dict | None
    created_at: datetime


@dataclass(frozen=True)
class IterationInfo:
    """An iteration and the generation settings frozen when it started."""

    number: int
    policy_version: int
    preset: str
    method: str
    config: dict
    config_hash: str
    state: str
    created_at: datetime


@dataclass(frozen=True)
class PairSetInfo:
    """A named, hashed set of curated pairs of one iteration."""

    id: int
    iteration: int | None  # None: imported (`csr pairs import`), of no iteration
    name: str
    preset: str
    params: dict
    selection_sql: str
    result_hash: str
    is_default: bool
    created_at: datetime
    source: str
    origin: dict | None


def _as(cls: type, row: Any):
    if row is None:
        return None
    mapping = row._mapping
    return cls(**{f.name: mapping[f.name] for f in fields(cls)})


class Transaction:
    def __init__(self, conn: Connection, writable: bool):
        self._conn, self._writable = conn, writable

    def _for_writing(self) -> Connection:
        if not self._writable:
            raise StoreError("a read transaction cannot write: use store.write()")
        return self._conn

    # -- prompts and images --------------------------------------------------------------
    def existing_prompts(self, external_ids: Sequence[str]) -> dict[str, tuple[str, str]]:
        return prompts.existing_prompts(self._conn, external_ids)

    def image_ids(self, hashes: Sequence[str]) -> dict[str, int]:
        return prompts.image_ids(self._conn, hashes)

    def insert_images(self, images: list[dict]) -> None:
        prompts.insert_images(self._for_writing(), images)

    def insert_prompts(self, rows: list[dict]) -> None:
        prompts.insert_prompts(self._for_writing(), rows)

    def prompt_inputs(self, prompt_ids: list[int]) -> dict[int, tuple[str, str, int, str]]:
        return iterations.prompt_inputs(self._conn, prompt_ids)

    # -- iterations and the queue --------------------------------------------------------
    def iteration(self, number: int) -> IterationInfo | None:
        return _as(IterationInfo, iterations.get_iteration(self._conn, number))

    def progress(self, iteration: int) -> dict[str, int]:
        return iterations.progress(self._conn, iteration)

    def holders(self, iteration: int, exclude_worker: int | None = None) -> list[workers.Holder]:
        return workers.holders(self._conn, iteration, exclude_worker=exclude_worker)

    def worker_states(self) -> list[dict]:
        return workers.worker_states(self._conn)

    def failed_items(self, limit: int | None = None) -> list[dict]:
        return iterations.failed_items(self._conn, limit)

    def status(self) -> dict:
        return summary.status(self._conn)

    # -- model versions and training runs ------------------------------------------------
    def model_version(self, version: int) -> VersionInfo | None:
        return _as(VersionInfo, versions.model_version(self._conn, version))

    def register_base_model(self, model: str, clip: str, clip_pretrained: str | None) -> str:
        return versions.register_base_model(self._for_writing(), model, clip, clip_pretrained)

    def lineage(self, version: int) -> list[dict]:
        return versions.lineage(self._conn, version)

    def find_resumable_run(self, iteration: int, pairs_hash: str, hyperparams: dict):
        return versions.find_resumable_run(self._conn, iteration, pairs_hash, hyperparams)

    def start_training_run(self, iteration: int, pair_set_id: int, pairs_hash: str, hyperparams: dict,
                           checkpoint_dir: str, selection_sql: str = curation.TRAINING_SELECTION) -> int:
        """A run records the trainer's one query (`training_rows`) with the hash of its result."""
        return versions.start_training_run(self._for_writing(), iteration, pair_set_id, selection_sql,
                                           pairs_hash, hyperparams, checkpoint_dir)

    def mark_run(self, run_id: int, state: str, metrics: list | None = None) -> None:
        versions.mark_run(self._for_writing(), run_id, state, metrics)

    def register_version(self, **kwargs) -> None:
        versions.register_version(self._for_writing(), **kwargs)

    # -- curation ------------------------------------------------------------------------
    def record_curation(self, selection: curation.Selection, make_default: bool = False) -> curation.CurationResult:
        return curation.record(self._for_writing(), selection, make_default=make_default)

    def pair_set(self, iteration: int, name: str | None = None) -> PairSetInfo | None:
        return _as(PairSetInfo, curation.pair_set(self._conn, iteration, name))

    def training_rows(self, pair_set_id: int, token_ids: bool = True) -> list[dict]:
        return curation.training_rows(self._conn, pair_set_id, token_ids)

    def pair_clip_means(self, pair_set_id: int) -> tuple[float | None, float | None]:
        return curation.pair_clip_means(self._conn, pair_set_id)

    # -- self-rewarding and imported pair sets -------------------------------------------
    def curate_self_reward(self, iteration: int, min_margin: float = 0.0, name: str | None = None,
                           make_default: bool = False) -> curation.CurationResult:
        return self_reward_curation.curate(self._for_writing(), iteration, min_margin, name, make_default)

    def imported_pair_set(self, name: str) -> PairSetInfo | None:
        return _as(PairSetInfo, outside_pairs.imported_pair_set(self._conn, name))

    def insert_imported_pair_set(self, name: str, origin: dict, params: dict, result_hash: str,
                                 pairs: list[dict]) -> int:
        return outside_pairs.insert_pair_set(self._for_writing(), name, origin, params, result_hash, pairs)

    def outside_training_rows(self, pair_set_id: int) -> list[dict]:
        return outside_pairs.training_rows(self._conn, pair_set_id)

    def start_outside_iteration(self, number: int, config: dict) -> bool:
        return outside_pairs.start_outside_iteration(self._for_writing(), number, config)

    # -- evaluations ---------------------------------------------------------------------
    def find_evaluation(self, model_version: int, fingerprint: str) -> dict | None:
        return evaluations.find_evaluation(self._conn, model_version, fingerprint)

    def record_evaluation(self, **kwargs) -> bool:
        return evaluations.record_evaluation(self._for_writing(), **kwargs)

