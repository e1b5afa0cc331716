"""The store has one door (issue 23): outside storage/, code imports the
Store's public names (`csr.storage`) and the analytics door
(`csr.storage.analytics`) only, and never names SQLAlchemy. Read from the
source, so a new import that goes round the door fails here."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import csr.storage

ROOT = Path(__file__).resolve().parents[1]
OUTSIDE_STORAGE = sorted(p for folder in ("engine", "cli") for p in (ROOT / folder).rglob("*.py"))
DOORS = {"csr.storage", "csr.storage.analytics"}


def _storage_imports(path: Path) -> list[str]:
    """Every storage module or name `path` imports, as `module` or `module:name`."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names if alias.name.startswith("csr.storage")]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("csr.storage"):
            found += [f"{node.module}:{alias.name}" for alias in node.names]
    return found


def _went_round(entry: str) -> bool:
    module, _, name = entry.partition(":")
    if module not in DOORS:
        return True
    # `from csr.storage import work` would open a module behind the door.
    return module == "csr.storage" and bool(name) and name != "analytics" and name not in csr.storage.__all__


def test_there_is_code_to_check():
    assert len(OUTSIDE_STORAGE) > 40
    assert any(_storage_imports(p) for p in OUTSIDE_STORAGE)


@pytest.mark.parametrize("path", OUTSIDE_STORAGE, ids=lambda p: str(p.relative_to(ROOT)))
def test_engine_and_cli_use_the_store_door_only(path):
    round_the_door = [entry for entry in _storage_imports(path) if _went_round(entry)]
    assert not round_the_door, f"{path.relative_to(ROOT)} imports behind the store's door: {round_the_door}"


@pytest.mark.parametrize("path", OUTSIDE_STORAGE, ids=lambda p: str(p.relative_to(ROOT)))
def test_sqlalchemy_stays_inside_storage(path):
    assert "sqlalchemy" not in path.read_text().lower(), f"{path.relative_to(ROOT)} names SQLAlchemy"


def test_the_check_catches_a_module_behind_the_door(tmp_path):
    sneaky = tmp_path / "sneaky.py"
    sneaky.write_text("from csr.storage import work\nfrom csr.storage.db import make_engine\nimport csr.storage.trees\n")
    assert [e for e in _storage_imports(sneaky) if _went_round(e)] == [
        "csr.storage:work", "csr.storage.db:make_engine", "csr.storage.trees"]


def test_every_public_name_exists():
    missing = [name for name in csr.storage.__all__ if not hasattr(csr.storage, name)]
    assert not missing
