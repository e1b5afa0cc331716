"""The study's settings file, csr.toml, and where the store is.

Store URL precedence: --db, then CSR_DATABASE_URL, then csr.toml, then
sqlite:///csr.db in the working directory.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from csr.engine.errors import CsrError, SettingsError
from csr.engine.search.config import SearchConfig
from csr.engine.self_reward import SelfRewardConfig
from csr.engine.settings_table import SettingsTable
from csr.engine.train.config import TrainConfig
from csr.storage import DEFAULT_URL, normalise_url

CONFIG_FILE = "csr.toml"
DEFAULT_MODEL = "llava-hf/llava-1.5-7b-hf"
DEFAULT_CLIP = "ViT-L-14-336"
DEFAULT_CLIP_PRETRAINED = "openai"
DEFAULT_MODELS_DIR = "models"
HEADER = "# csr study settings (see README: Configuration)\n\n"


class StoreTable(SettingsTable):
    url: str = DEFAULT_URL


class ModelTable(SettingsTable):
    base: str = DEFAULT_MODEL
    clip: str = DEFAULT_CLIP
    clip_pretrained: str | None = DEFAULT_CLIP_PRETRAINED


class PathsTable(SettingsTable):
    models_dir: str = DEFAULT_MODELS_DIR


# Every table csr.toml may hold. [generate] and [train] are checked on their
# own when the file is read, and again once a command's flags are added.
TABLES: dict[str, type[SettingsTable]] = {
    "store": StoreTable,
    "model": ModelTable,
    "paths": PathsTable,
    "generate": SearchConfig,
    "train": TrainConfig,
    "self_reward": SelfRewardConfig,
}


@dataclass
class Settings:
    path: Path
    store_url: str = DEFAULT_URL
    model: str = DEFAULT_MODEL
    clip: str = DEFAULT_CLIP
    clip_pretrained: str | None = DEFAULT_CLIP_PRETRAINED
    models_dir: str = DEFAULT_MODELS_DIR
    # As written in the file: the keys left out keep following the defaults
    # (and, for the search, the preset), flags can still be laid on top.
    generate: dict = field(default_factory=dict)
    train: dict = field(default_factory=dict)
    self_reward: dict = field(default_factory=dict)

    @property
    def directory(self) -> Path:
        return self.path.parent

    def models_path(self) -> Path:
        path = Path(self.models_dir)
        return path if path.is_absolute() else self.directory / path

    def write(self, *, store_url: bool = True) -> None:
        """Write the settings into csr.toml, editing it in place: comments, layout
        and the spelling of values left unchanged (`1e-3`) stay as the user wrote
        them. `store_url=False` leaves [store] url as it is in the file (absent
        stays absent: CSR_DATABASE_URL or the default keeps deciding)."""
        import tomlkit

        tables = {
            "store": {"url": self.store_url} if store_url else {},
            "model": {"base": self.model, "clip": self.clip, "clip_pretrained": self.clip_pretrained},
            "paths": {"models_dir": self.models_dir},
            "generate": self.generate,
            "train": self.train,
            "self_reward": self.self_reward,
        }
        document = tomlkit.parse(self.path.read_text()) if self.path.exists() else tomlkit.parse(HEADER)
        for name, values in tables.items():
            # TOML has no null: an unset value is a key left out.
            _check(self.path, name, {k: v for k, v in values.items() if v is not None})
            if name not in document:
                if not values and name == "store":
                    continue
                document.add(name, tomlkit.table())
            table = document[name]
            if name in ("generate", "train"):  # these hold what the file says: a key dropped here goes
                for key in [k for k in table if k not in values]:
                    del table[key]
            for key, value in values.items():
                if value is None:
                    table.pop(key, None)
                elif key not in table or table[key] != value:
                    table[key] = value
        self.path.write_text(tomlkit.dumps(document))


def _check(path: Path, name: str, values: Any) -> SettingsTable:
    if not isinstance(values, dict):
        raise CsrError(f"{path}: [{name}] must be a table, got {values!r}")
    try:
        return TABLES[name].from_dict(values)
    except SettingsError as exc:
        raise CsrError(f"[{name}] in {path}: {exc}") from exc


def load_settings(config_path: Path | None = None) -> Settings:
    path = Path(config_path) if config_path else Path.cwd() / CONFIG_FILE
    settings = Settings(path=path.resolve())
    if not path.exists():
        if config_path is not None:
            raise CsrError(f"settings file not found: {path}")
        return settings
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise CsrError(f"{path}: not valid TOML: {exc}") from exc
    unknown = set(data) - set(TABLES)
    if unknown:
        raise CsrError(f"{path}: unknown section(s) {sorted(unknown)}; known: {list(TABLES)}")
    tables = {name: _check(settings.path, name, data.get(name, {})) for name in TABLES}
    store, model, paths = tables["store"], tables["model"], tables["paths"]
    settings.store_url = store.url
    settings.model, settings.clip, settings.clip_pretrained = model.base, model.clip, model.clip_pretrained
    settings.models_dir = paths.models_dir
    settings.generate = dict(data.get("generate", {}))
    settings.train = dict(data.get("train", {}))
    settings.self_reward = dict(data.get("self_reward", {}))
    return settings


def resolve_store_url(settings: Settings, db_option: str | None) -> str:
    if db_option:
        return normalise_url(db_option)
    env = os.environ.get("CSR_DATABASE_URL")
    if env:
        return normalise_url(env)
    url = normalise_url(settings.store_url)
    # A relative SQLite path in csr.toml is relative to the file, not to where csr runs.
    prefix = "sqlite:///"
    if url.startswith(prefix) and settings.path.exists():
        rest = url[len(prefix):]
        if rest and rest != ":memory:" and not Path(rest).is_absolute():
            url = prefix + str(settings.directory / rest)
    return url
