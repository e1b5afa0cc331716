"""The one place that knows vision-language architectures: an adapter per
family (engine/models/families.py), found from the config's `model_type`.

Everything else asks `adapter_for(config)`; nothing outside this package
tests a model type or a module name.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from csr.engine.errors import ModelLoadError
from csr.engine.models.base import Adapter, MRopeAdapter
from csr.engine.models.families import ADAPTERS, LLAVA, REFUSED

__all__ = ["ADAPTERS", "LLAVA", "Adapter", "MRopeAdapter", "UnsupportedModelError", "adapter_for", "adapter_for_type",
           "check_family", "supported_families"]

_BY_TYPE: dict[str, Adapter] = {t: a for a in ADAPTERS for t in a.model_types}


class UnsupportedModelError(ModelLoadError):
    """A model of a family csr has no adapter for."""


def supported_families() -> str:
    return ", ".join(a.family for a in ADAPTERS)


def adapter_for_type(model_type: str | None) -> Adapter:
    """The adapter of a `model_type`, or one line naming the supported families."""
    adapter = _BY_TYPE.get(str(model_type))
    if adapter is not None:
        return adapter
    if model_type in REFUSED:
        raise UnsupportedModelError(f"model type {model_type!r} is not supported: {REFUSED[model_type]}; "
                                    f"supported: {supported_families()}")
    raise UnsupportedModelError(
        f"model type {model_type!r} is not a supported vision-language family; supported: {supported_families()} "
        "(docs/models.md)"
    )


def adapter_for(config_or_model: Any) -> Adapter:
    """The adapter of a model or of its config."""
    config = getattr(config_or_model, "config", config_or_model)
    return adapter_for_type(getattr(config, "model_type", None))


def check_family(name_or_path: str) -> Adapter | None:
    """Refuse a model of an unsupported family before anything is written,
    without loading weights or downloading: a local directory's config.json,
    or a hub id's config already in the local cache. None when the family
    cannot be known offline (the load refuses it then)."""
    if "vila" in str(name_or_path).lower().rsplit("/", 1)[-1]:
        raise UnsupportedModelError(f"{name_or_path}: {REFUSED['llava_llama']}; supported: {supported_families()}")
    path = Path(str(name_or_path)).expanduser()
    config_file = path / "config.json"
    if config_file.is_file():
        try:
            config = json.loads(config_file.read_text())
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"cannot read {config_file}: {exc}") from exc
        if config.get("auto_map") and config.get("model_type") not in _BY_TYPE:
            raise UnsupportedModelError(
                f"{name_or_path} needs remote code ({config.get('model_type')!r}), which csr does not run; "
                f"supported: {supported_families()}"
            )
        return adapter_for_type(config.get("model_type"))
    if path.exists():
        return None
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(str(name_or_path), local_files_only=True)
    except Exception:  # noqa: BLE001  (not cached, or remote code: the load says which)
        return None
    return adapter_for(config)
