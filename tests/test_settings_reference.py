"""docs/settings.md is generated from the settings and cannot drift from them."""

from __future__ import annotations

from pathlib import Path

from csr.engine import settings_reference

PAGE = Path(__file__).parents[1] / "docs" / "settings.md"


def test_every_setting_is_described():
    assert _undescribed_keys() == []


def test_the_page_is_what_the_code_generates():
    assert PAGE.read_text() == settings_reference.render(), (
        "docs/settings.md is stale: python -m csr.engine.settings_reference > docs/settings.md"
    )


def _undescribed_keys() -> list[str]:
    """Settings keys the reference page has no words for."""
    ref = settings_reference
    described = {**ref.LOCATIONS, "generate": ref.GENERATE, "train": ref.TRAIN, "self_reward": ref.SELF_REWARD}
    return [f"[{section}] {name}" for section, table in ref.TABLES.items()
            for name in table.model_fields if name not in described.get(section, {})]
