"""The study's settings file, csr.toml, and where the store is.

Store URL precedence: --db, then CSR_DATABASE_URL, then csr.toml, then
sqlite:///csr.db in the working directory.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from csr.engine.errors import CsrError
from csr.storage.db import DEFAULT_URL, normalise_url

CONFIG_FILE = "csr.toml"
DEFAULT_MODEL = "llava-hf/llava-1.5-7b-hf"
DEFAULT_CLIP = "ViT-L-14-336"
DEFAULT_CLIP_PRETRAINED = "openai"
SECTIONS = ("store", "model", "generate", "train", "paths")


@dataclass
class Settings:
    path: Path
    store_url: str = DEFAULT_URL
    model: str = DEFAULT_MODEL
    clip: str = DEFAULT_CLIP
    clip_pretrained: str | None = DEFAULT_CLIP_PRETRAINED
    models_dir: str = "models"
    generate: dict = field(default_factory=dict)
    train: dict = field(default_factory=dict)

    @property
    def directory(self) -> Path:
        return self.path.parent

    def models_path(self) -> Path:
        path = Path(self.models_dir)
        return path if path.is_absolute() else self.directory / path

    def write(self) -> None:
        sections = {
            "store": {"url": self.store_url},
            "model": {"base": self.model, "clip": self.clip, "clip_pretrained": self.clip_pretrained},
            "paths": {"models_dir": self.models_dir},
            "generate": self.generate,
            "train": self.train,
        }
        lines = ["# csr study settings (see README: Configuration)"]
        for name, values in sections.items():
            lines.append(f"\n[{name}]")
            for key, value in values.items():
                if value is not None:
                    lines.append(f"{key} = {_toml_value(value)}")
        self.path.write_text("\n".join(lines) + "\n")


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    text = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'


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
    unknown = set(data) - set(SECTIONS)
    if unknown:
        raise CsrError(f"{path}: unknown section(s) {sorted(unknown)}; known: {list(SECTIONS)}")
    store = data.get("store", {})
    model = data.get("model", {})
    settings.store_url = store.get("url", settings.store_url)
    settings.model = model.get("base", settings.model)
    settings.clip = model.get("clip", settings.clip)
    settings.clip_pretrained = model.get("clip_pretrained", settings.clip_pretrained)
    settings.models_dir = data.get("paths", {}).get("models_dir", settings.models_dir)
    settings.generate = dict(data.get("generate", {}))
    settings.train = dict(data.get("train", {}))
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
