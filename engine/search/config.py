"""Every setting of the sentence-level beam search, and what each preset implies.

The defaults are appendix A.1's; `PRESET_SEARCH_DEFAULTS` holds the four
settings a preset decides (README: Reward presets). The resolved config is
recorded with each iteration, so a tree can always be traced to its settings.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal, get_args

from pydantic import Field, model_validator

from csr.engine.rewards import Preset
from csr.engine.search.degenerate import RuleSet
from csr.engine.settings_table import Number, SettingsTable

SelectBy = Literal["reward", "text"]
SELECT_BY: tuple[str, ...] = get_args(SelectBy)
# Each preset's rule for the active set is named after it.
KEEP_RULES: tuple[str, ...] = tuple(Preset)

# What each preset implies for the search; any of these can still be set on its own.
PRESET_SEARCH_DEFAULTS: dict[Preset, dict[str, Any]] = {
    Preset.paper: {
        "max_new_tokens": 74,  # appendix A.1
        "select_by": "reward",  # the calibrated reward guides the selection (section 3.2.1)
        "keep_rule": Preset.paper,  # num_beams in all: top ceil(k/2) + bottom floor(k/2)
        "degenerate_rules": "csr",
    },
    Preset.reference_code: {
        "max_new_tokens": 70,  # step1.sh
        "select_by": "text",  # node.score: the path's sum of penalised beam scores
        "keep_rule": Preset.reference_code,  # new_nodes[:int(k/2)-1] + new_nodes[-int(k/2):]
        "degenerate_rules": "reference-code",  # clean_tree + score.py
    },
}


class SearchConfig(SettingsTable):
    """Every setting of the sentence-level beam search (appendix A.1 defaults).

    `max_new_tokens`, `select_by`, `keep_rule` and `degenerate_rules` left as
    None take the preset's value (PRESET_SEARCH_DEFAULTS); `to_dict` records
    the resolved values with the iteration.
    """

    noun: ClassVar[str] = "search setting"

    num_token_beams: int = Field(5, gt=0)
    num_beam_groups: int = Field(5, gt=0)
    diversity_penalty: Number = Field(3.0, ge=0)
    max_new_tokens: int | None = Field(None, gt=0)
    max_length: int = Field(1024, gt=0)
    num_beams: int = Field(5, gt=0)
    preset: Preset = Field(Preset.paper, strict=False)
    lam: Number = Field(0.9, ge=0, le=1)
    select_by: SelectBy | None = None
    keep_rule: Preset | None = Field(None, strict=False)
    degenerate_rules: RuleSet | None = None

    @model_validator(mode="before")
    @classmethod
    def _preset_fills_the_unset(cls, data: Any) -> Any:
        preset = data.get("preset", Preset.paper) if isinstance(data, dict) else None
        if not isinstance(preset, str) or preset not in PRESET_SEARCH_DEFAULTS:
            return data  # not a preset: the field's own check says so
        implied = PRESET_SEARCH_DEFAULTS[Preset(preset)]
        return {**data, **{k: v for k, v in implied.items() if data.get(k) is None}}

    @model_validator(mode="after")
    def _groups_divide_the_beams(self) -> SearchConfig:
        if self.num_token_beams % self.num_beam_groups:
            raise ValueError(
                f"num_token_beams ({self.num_token_beams}) must be a multiple of "
                f"num_beam_groups ({self.num_beam_groups})"
            )
        return self

    @property
    def beam_settings_kwargs(self) -> dict[str, Any]:
        return {
            "num_beams": self.num_token_beams,
            "num_beam_groups": self.num_beam_groups,
            "diversity_penalty": self.diversity_penalty,
        }
