"""Help as the field's tools write it: `--iter N`, `--images PATH`, `FILE`,
choices as [a|b]; never a Python type (typer shows `<str>`, `<int range>`,
`<list[Path]>`), never an empty `[]` for a hidden argument in the usage line."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import get_args, get_origin

from typer.core import TyperGroup

# Options whose value has a better name than its type.
NAMED_VALUES = {
    "--iter": "N",
    "--db": "URL",
    "--config": "FILE",
    "--model-version": "N",
    "--model-versions": "LIST",
    "--device": "DEVICE",
    "--devices": "LIST",
    "--pair-set": "NAME",
    "--limit": "N",
    "--metric": "NAME=VALUE",
}
TYPE_NAMES = {int: "INTEGER", float: "NUMBER", str: "TEXT", Path: "PATH"}


def value_name(option) -> str:
    """What `--flag VALUE` shows for an option that takes a value."""
    for flag in option.opts:
        if flag in NAMED_VALUES:
            return NAMED_VALUES[flag]
    kind = option.type_descriptor.annotation
    if get_origin(kind) is list:
        kind = get_args(kind)[0]
    if isinstance(kind, type) and issubclass(kind, Enum):
        return "[" + "|".join(str(member.value) for member in kind) + "]"
    return TYPE_NAMES.get(kind, "VALUE")


def _plain_argument(argument) -> None:
    name = argument.metavar or argument.name.upper()
    argument.metavar = name
    argument.display_type_rich = lambda ctx: None
    if argument.hidden:
        argument.get_usage_pieces = lambda ctx: []
    elif not argument.required:
        argument.get_usage_pieces = lambda ctx: [f"[{name}]"]
    else:
        argument.get_usage_pieces = lambda ctx: [name]


def plain_help(command) -> None:
    """Give every option and argument of `command` (and below) a plain value name."""
    for sub in getattr(command, "commands", {}).values():
        plain_help(sub)
    for param in command.params:
        if param.param_type_name == "argument":
            _plain_argument(param)
        elif not getattr(param, "is_flag", False) and param.metavar is None and hasattr(param, "type_descriptor"):
            param.metavar = value_name(param)


class CsrGroup(TyperGroup):
    """The root `csr` group: typer builds the sub-commands first, so the whole
    tree is there to be given plain help when the root is made."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        plain_help(self)
