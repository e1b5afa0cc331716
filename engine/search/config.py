"""Every setting of the sentence-level beam search, and what each preset implies.

The defaults are appendix A.1's; `PRESET_SEARCH_DEFAULTS` holds the four
settings a preset decides (README: Reward presets). The resolved config is
recorded with each iteration, so a tree can always be traced to its settings.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from csr.engine.rewards import Preset, check_preset
from csr.engine.search import degenerate

SELECT_BY = ("reward", "text")
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


@dataclass(frozen=True)
class SearchConfig:
    """Every setting of the sentence-level beam search (appendix A.1 defaults).

    `max_new_tokens`, `select_by`, `keep_rule` and `degenerate_rules` left as
    None take the preset's value (PRESET_SEARCH_DEFAULTS); `to_dict` records
    the resolved values with the iteration.
    """

    num_token_beams: int = 5
    num_beam_groups: int = 5
    diversity_penalty: float = 3.0
    max_new_tokens: int | None = None
    max_length: int = 1024
    num_beams: int = 5
    preset: str = Preset.paper
    lam: float = 0.9
    select_by: str | None = None
    keep_rule: str | None = None
    degenerate_rules: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "preset", check_preset(self.preset).value)
        for name, value in PRESET_SEARCH_DEFAULTS[self.preset].items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
        for name in ("num_token_beams", "num_beam_groups", "max_new_tokens", "max_length", "num_beams"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.num_token_beams % self.num_beam_groups:
            raise ValueError(
                f"num_token_beams ({self.num_token_beams}) must be a multiple of "
                f"num_beam_groups ({self.num_beam_groups})"
            )
        for name in ("diversity_penalty", "lam"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or isinstance(value, bool):
                raise ValueError(f"{name} must be a number, got {value!r}")
        if not self.diversity_penalty >= 0:
            raise ValueError(f"diversity_penalty must be >= 0, got {self.diversity_penalty!r}")
        if not 0.0 <= self.lam <= 1.0:
            raise ValueError(f"lam must lie in [0, 1], got {self.lam!r}")
        if self.select_by not in SELECT_BY:
            raise ValueError(f"select_by must be one of {', '.join(SELECT_BY)}, got {self.select_by!r}")
        if self.keep_rule not in KEEP_RULES:
            raise ValueError(f"keep_rule must be one of {', '.join(KEEP_RULES)}, got {self.keep_rule!r}")
        if self.degenerate_rules not in degenerate.RULE_SETS:
            raise ValueError(
                f"degenerate_rules must be one of {', '.join(degenerate.RULE_SETS)}, got {self.degenerate_rules!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SearchConfig:
        """Missing keys take their defaults; unknown keys are an error (a typo must not pass)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown search setting(s): {', '.join(unknown)}")
        return cls(**data)

    @property
    def beam_settings_kwargs(self) -> dict[str, Any]:
        return {
            "num_beams": self.num_token_beams,
            "num_beam_groups": self.num_beam_groups,
            "diversity_penalty": self.diversity_penalty,
        }
