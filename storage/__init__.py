"""The store: csr's one door to its database.

Engine and cli import from here only: `Store` (each method its own
transaction; a step that must be atomic is one method), the
dataclasses it returns, the errors it raises and a few pure helpers. The
modules behind it (one set of functions over a connection each) are
storage's own. The second, documented door is `csr.storage.analytics`:
read-only DuckDB over the live store, for `csr sql`, `csr stats` and
`csr report`.
"""

from csr.storage.clock import utcnow
from csr.storage.curation import (
    PAIR_RULES,
    PRESET_PAIR_RULE,
    PRESETS,
    TRAINING_SELECTION,
    CurationResult,
    CurationSettings,
)
from csr.storage.db import DEFAULT_URL, STORE_PACKAGES, display_url, normalise_url
from csr.storage.errors import (
    ImportRejected,
    MissingModelVersion,
    NoStore,
    NotAStore,
    NotGenerated,
    OrderError,
    SchemaMismatch,
    StoreError,
    StoreRefused,
    StoreUnavailable,
    WriteConflict,
)
from csr.storage.evaluations import evaluation_fingerprint
from csr.storage.hashing import json_digest
from csr.storage.infos import IterationInfo, PairSetInfo, VersionInfo
from csr.storage.iterations import CLAIMED, DONE, FAILED, PENDING
from csr.storage.migrate import schema_history
from csr.storage.outages import OutageRetry, as_store_error, first_line
from csr.storage.outside_pairs import pairs_digest
from csr.storage.store import Store
from csr.storage.trees import CANDIDATE_COLUMNS, RESPONSE_COLUMNS, Tree
from csr.storage.versions import BaseModelMismatch, describe_base_model
from csr.storage.work import Claim
from csr.storage.workers import GONE, LIVE, STALE, STOPPED, Holder

__all__ = [
    "CANDIDATE_COLUMNS", "CLAIMED", "DEFAULT_URL", "DONE", "FAILED", "GONE", "LIVE", "PAIR_RULES", "PENDING",
    "PRESETS", "PRESET_PAIR_RULE", "RESPONSE_COLUMNS", "STALE", "STOPPED", "STORE_PACKAGES", "TRAINING_SELECTION",
    "BaseModelMismatch", "Claim", "CurationResult", "CurationSettings", "Holder", "ImportRejected", "IterationInfo",
    "MissingModelVersion", "NoStore", "NotAStore", "NotGenerated", "OrderError", "OutageRetry", "PairSetInfo",
    "SchemaMismatch", "Store", "StoreError", "StoreRefused", "StoreUnavailable", "Tree",
    "VersionInfo", "WriteConflict", "as_store_error", "describe_base_model", "display_url",
    "evaluation_fingerprint", "first_line", "json_digest", "normalise_url", "pairs_digest", "schema_history",
    "utcnow",
]
