"""What every command needs: the settings file and the store URL."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import typer

from csr.engine.settings import Settings, load_settings, resolve_store_url


@dataclass
class CliState:
    db: str | None = None
    config: Path | None = None
    _settings: Settings | None = None

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            self._settings = load_settings(self.config)
        return self._settings

    @property
    def url(self) -> str:
        return resolve_store_url(self.settings, self.db)


def state(ctx: typer.Context) -> CliState:
    return ctx.find_root().obj
