"""Every setting of the sentence-level beam search, and what each preset implies.

The defaults are appendix A.1's; `PRESET_SEARCH_DEFAULTS` holds the
settings a preset decides (docs/presets.md). The resolved config is
recorded with each iteration, so a tree can always be traced to its settings;
a config recorded before a setting existed reads back with the behaviour the
search had then (`SearchConfig.from_recorded`).
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal, get_args

from pydantic import Field, model_validator

from csr.engine.prompting import PromptTemplate
from csr.engine.rewards import Preset
from csr.engine.search.degenerate import RuleSet
from csr.engine.settings_table import Number, SettingsTable

# reward: the path's cumulative response score; sentence-reward: the candidate's
# own R(s); text: the path's sum of penalised beam scores (the released node.score).
SelectBy = Literal["reward", "sentence-reward", "text"]
SELECT_BY: tuple[str, ...] = get_args(SelectBy)
# stop: EOS ends the sentence and the response; contained: EOS stops nothing
# (the release passes the period id as eos_token_id) and a candidate holding
# it anywhere is final.
EosRule = Literal["stop", "contained"]
# response-tokens: max_length bounds the response's tokens; characters: the
# decoded characters of prompt and response, as the release compares them.
MaxLengthUnit = Literal["response-tokens", "characters"]
# before-select: a degenerate candidate takes no place in the active set;
# after-search: it takes its place and is dropped with its subtree afterwards.
PruneDegenerate = Literal["before-select", "after-search"]
# full-stops: every id that decodes to "." alone ("." and "▁."); period-token:
# the one id of the token "." (29889 in Llama's vocabulary), as the release.
SentenceEnd = Literal["full-stops", "period-token"]
# Each preset's rule for the active set is named after it.
KEEP_RULES: tuple[str, ...] = tuple(Preset)

# What each preset implies for the search; any of these can still be set on its own.
PRESET_SEARCH_DEFAULTS: dict[Preset, dict[str, Any]] = {
    Preset.paper: {
        "max_new_tokens": 74,  # appendix A.1
        "select_by": "reward",  # the calibrated reward guides the selection (section 3.2.1)
        "keep_rule": Preset.paper,  # num_beams in all: top ceil(k/2) + bottom floor(k/2)
        "degenerate_rules": "csr",
        # The paper names no template; the processor's own works for every
        # architecture (docs/settings.md: prompt_template).
        "prompt_template": "chat",
        "eos_rule": "stop",
        "max_length_unit": "response-tokens",
        "prune_degenerate": "before-select",
        "sentence_end": "full-stops",
    },
    Preset.reference_code: {
        "max_new_tokens": 70,  # step1.sh
        "select_by": "text",  # node.score: the path's sum of penalised beam scores
        "keep_rule": Preset.reference_code,  # new_nodes[:int(k/2)-1] + new_nodes[-int(k/2):]
        "degenerate_rules": "reference-code",  # clean_tree + score.py
        "prompt_template": "llava-v1",  # get_prompts: conv_templates['v1']
        "eos_rule": "contained",  # eos_token_id=sentence_end_id; is_final: tokenizer.eos_token_id in gen_sequences[j]
        "max_length_unit": "characters",  # len(tokenizer.decode(outputs.sequences[j])) >= max_length
        "prune_degenerate": "after-search",  # clean_tree and score.py run on the finished tree
        "sentence_end": "period-token",  # --period_id 29889
    },
}

# What the search did before a setting existed, for configs recorded without it.
RECORDED_BEFORE: dict[str, Any] = {
    "prompt_template": "chat",
    "eos_rule": "stop",
    "max_length_unit": "response-tokens",
    "prune_degenerate": "before-select",
    "sentence_end": "full-stops",
}


class SearchConfig(SettingsTable):
    """Every setting of the sentence-level beam search (appendix A.1 defaults).

    The preset's settings (PRESET_SEARCH_DEFAULTS) left as None take the
    preset's value; `to_dict` records the resolved values with the iteration.
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
    prompt_template: PromptTemplate | None = None
    eos_rule: EosRule | None = None
    max_length_unit: MaxLengthUnit | None = None
    prune_degenerate: PruneDegenerate | None = None
    sentence_end: SentenceEnd | None = None

    @model_validator(mode="before")
    @classmethod
    def _preset_fills_the_unset(cls, data: Any) -> Any:
        preset = data.get("preset", Preset.paper) if isinstance(data, dict) else None
        if not isinstance(preset, str) or preset not in PRESET_SEARCH_DEFAULTS:
            return data  # not a preset: the field's own check says so
        implied = PRESET_SEARCH_DEFAULTS[Preset(preset)]
        return {**data, **{k: v for k, v in implied.items() if data.get(k) is None}}

    def to_dict(self) -> dict[str, Any]:
        """The recorded form. A setting at the value the search had before it
        existed (RECORDED_BEFORE) is left out, so that the records, and the
        hashes iterations are compared by, of every study that does not use it
        stay as they were; `from_recorded` reads it back."""
        return {k: v for k, v in super().to_dict().items() if k not in RECORDED_BEFORE or v != RECORDED_BEFORE[k]}

    def replace(self, **changes: Any) -> SearchConfig:
        return type(self)(**{**self.model_dump(), **changes})

    @classmethod
    def from_recorded(cls, data: dict[str, Any]) -> SearchConfig:
        """The config an iteration recorded (`to_dict`): a setting left out
        has the value the search had before it existed, whatever the preset
        says now."""
        return cls.from_dict({**RECORDED_BEFORE, **data})

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
