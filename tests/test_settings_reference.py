"""docs/settings.md is generated from the settings and cannot drift from them."""

from __future__ import annotations

from pathlib import Path

from csr.engine import settings_reference

PAGE = Path(__file__).parents[1] / "docs" / "settings.md"


def test_every_setting_is_described():
    assert settings_reference.missing_keys() == []


def test_the_page_is_what_the_code_generates():
    assert PAGE.read_text() == settings_reference.render(), (
        "docs/settings.md is stale: python -m csr.engine.settings_reference > docs/settings.md"
    )
