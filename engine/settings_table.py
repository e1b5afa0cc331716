"""One table of csr.toml as a pydantic model: unknown keys refused, TOML's own
types required, and every refusal one line that names the key.

`[generate]` (engine/search/config.py), `[train]` (engine/train/config.py),
`[store]`, `[model]` and `[paths]` (engine/settings.py) derive from
`SettingsTable`. A table is frozen: what it holds is what gets recorded.
"""

from __future__ import annotations

import types
from enum import Enum
from typing import Any, ClassVar, Literal, Self, Union, get_args, get_origin

import annotated_types
from pydantic import BaseModel, ConfigDict, ValidationError

from csr.engine.errors import SettingsError

# A float setting keeps an integer as written (`lam = 1` stays 1): the recorded
# settings, and the hashes over them, are what they were with the dataclasses.
Number = float | int

_TYPE_ERRORS = ("_type", "_parsing", "int_from_float")
_BOUND_ERRORS = ("greater_than", "greater_than_equal", "less_than", "less_than_equal")


class SettingsTable(BaseModel):
    # strict: TOML already has integers, floats, booleans and strings, so "5"
    # for an integer is a mistake, not something to convert. Choices (enums)
    # opt out per field, since TOML spells them as strings.
    model_config = ConfigDict(
        extra="forbid", frozen=True, strict=True, use_enum_values=True, validate_default=True
    )

    # What one key of the table is called in an error: "training option lr".
    noun: ClassVar[str] = "setting"
    error: ClassVar[type[SettingsError]] = SettingsError

    def __init__(self, /, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise self.error(describe(type(self), exc)) from exc

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump()

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        """Missing keys take their defaults; unknown keys are refused (a typo must not pass)."""
        return cls(**data)

    def replace(self, **changes: Any) -> Self:
        """A copy with `changes`, validated like a new table."""
        return type(self)(**{**self.to_dict(), **changes})


def describe(table: type[SettingsTable], exc: ValidationError) -> str:
    """The problems pydantic found, as one line in csr's words."""
    errors = exc.errors(include_url=False)
    unknown = sorted({str(e["loc"][0]) for e in errors if e["type"] == "extra_forbidden"})
    parts = []
    if unknown:
        known = ", ".join(sorted(table.model_fields))
        parts.append(f"unknown {table.noun}(s): {', '.join(unknown)} (known: {known})")
    seen: set[str] = set()
    for error in errors:
        if error["type"] == "extra_forbidden":
            continue
        name = str(error["loc"][0]) if error["loc"] else ""
        if name in seen:  # a union field reports once per member type
            continue
        seen.add(name)
        parts.append(_problem(table, name, error))
    return "; ".join(parts)


def _problem(table: type[SettingsTable], name: str, error: dict[str, Any]) -> str:
    kind = error["type"]
    if kind == "value_error" or name not in table.model_fields:
        # a validator's own message (ValueError), e.g. a rule across two keys
        cause = error.get("ctx", {}).get("error")
        return str(cause) if cause is not None else error["msg"]
    field = table.model_fields[name]
    got = f", got {error['input']!r}"
    if kind in _BOUND_ERRORS:
        return f"{table.noun} {name} must be {_bounds(field.metadata)}{got}"
    if kind in ("enum", "literal_error") or _choices(field.annotation):
        return f"{table.noun} {name} must be one of {', '.join(_choices(field.annotation))}{got}"
    if kind.endswith(_TYPE_ERRORS):
        return f"{table.noun} {name} must be {_expected(field.annotation)}{got}"
    return f"{table.noun} {name}: {error['msg']}{got}"


def _members(annotation: Any) -> tuple[set[Any], bool]:
    """The types a field admits, and whether it may be left unset (None)."""
    if get_origin(annotation) in (Union, types.UnionType):
        members = set(get_args(annotation))
    else:
        members = {annotation}
    return members - {type(None)}, type(None) in members


def _choices(annotation: Any) -> list[str]:
    members, _ = _members(annotation)
    for member in members:
        if get_origin(member) is Literal:
            return [str(v) for v in get_args(member)]
        if isinstance(member, type) and issubclass(member, Enum):
            return [str(m.value) for m in member]
    return []


def _expected(annotation: Any) -> str:
    members, optional = _members(annotation)
    if members == {bool}:
        return "true, false or unset" if optional else "a boolean"
    if members == {int}:
        return "an integer"
    if members <= {int, float}:
        return "a number"
    return "a string"


def _bounds(metadata: list[Any]) -> str:
    low = high = None
    for bound in metadata:
        if isinstance(bound, annotated_types.Ge):
            low = f"[{bound.ge}"
        elif isinstance(bound, annotated_types.Gt):
            low = f"({bound.gt}"
        elif isinstance(bound, annotated_types.Le):
            high = f"{bound.le}]"
        elif isinstance(bound, annotated_types.Lt):
            high = f"{bound.lt})"
    if low and high:
        return f"in {low}, {high}"
    if low:
        return (">= " if low[0] == "[" else "> ") + low[1:]
    return ("<= " if high[-1] == "]" else "< ") + high[:-1]
