"""The one canonical-JSON digest behind every stored hash and fingerprint
(iteration configs, training pairs and runs, evaluations, demo model caches)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from typing import Any


def json_digest(value: Any, *, default: Callable[[Any], Any] | None = None, compact: bool = False) -> str:
    """sha256 of `value` as JSON with sorted keys. `compact` drops the spaces
    after separators: evaluation fingerprints were stored that way, and a
    digest must never change under rows already in a store."""
    separators = (",", ":") if compact else None
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=default, separators=separators).encode()).hexdigest()
