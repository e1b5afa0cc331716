"""What the store's methods return about versions, iterations and pair sets:
frozen dataclasses, never SQLAlchemy rows, so nothing outside storage/
depends on the schema's classes."""

from __future__ import annotations

from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any


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


def row_as(cls: type, row: Any):
    """A row of a store query as one of the dataclasses above (None stays None)."""
    if row is None:
        return None
    mapping = row._mapping
    return cls(**{f.name: mapping[f.name] for f in fields(cls)})
