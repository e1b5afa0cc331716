"""How csr prints: consoles whose width is the terminal's only when they write
to a terminal, and JSON results on stdout."""

from __future__ import annotations

import json
from typing import Any

import rich.console
import typer
from rich.console import ConsoleDimensions

# Piped or redirected output is a file, not a screen: lines and tables are
# never cut or wrapped to fit a terminal that another stream happens to have.
PIPED_WIDTH = 4096


class Console(rich.console.Console):
    """rich's Console, as wide as its content when it does not write to a terminal
    (rich takes the width of whichever standard stream is a terminal, or COLUMNS, else 80)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if kwargs.get("width") is None and not self.is_terminal:
            self._width = None  # COLUMNS describes a terminal this console does not write to

    @property
    def size(self) -> ConsoleDimensions:
        if self._width is None and not self.is_terminal:
            return ConsoleDimensions(PIPED_WIDTH, self._height or 25)
        return super().size

    @size.setter
    def size(self, new_size: tuple[int, int]) -> None:
        rich.console.Console.size.fset(self, new_size)


def json_option(what: str = "The result") -> Any:
    return typer.Option(False, "--json", help=f"{what} as JSON on stdout (messages go to stderr).")


def echo_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, default=str))


def consoles(as_json: bool) -> Console:
    """Where a command's human-readable lines go: stdout, or stderr under --json."""
    return Console(stderr=True) if as_json else Console()
