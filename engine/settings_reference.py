"""docs/settings.md, generated from the settings themselves.

Every key of csr.toml with its default, read from the table's model:
`[store]`, `[model]`, `[paths]` (engine/settings.py), `[generate]`
(engine/search/config.py: SearchConfig) and `[train]` (engine/train/config.py:
TrainConfig); for the last two also the paper's and the released code's
value where they are known. A key without an entry here fails
tests/test_settings_reference.py, and so does a docs/settings.md that differs
from `render()`: the page cannot drift.

    python -m csr.engine.settings_reference > docs/settings.md
"""

from __future__ import annotations

from csr.engine.search.config import PRESET_SEARCH_DEFAULTS, SearchConfig
from csr.engine.settings import TABLES
from csr.engine.train.config import TrainConfig

SAME = "same"

# [store], [model], [paths]: key -> what it does (the paper and the released code say nothing here).
LOCATIONS = {
    "store": {
        "url": "the store: a SQLAlchemy URL, or a bare path for SQLite; a relative SQLite path is relative "
               "to csr.toml. `--db` and `CSR_DATABASE_URL` come first",
    },
    "model": {
        "base": "model version 0: a hub id or a local directory (`csr init --model`)",
        "clip": "the CLIP model of R_I: an open_clip name, `hf-hub:ID` or `local-dir:PATH` (`--clip`)",
        "clip_pretrained": "open_clip's pretrained tag; `csr init` leaves it out for `hf-hub:` and `local-dir:` "
                           "(`--clip-pretrained`)",
    },
    "paths": {
        "models_dir": "where `csr train` writes model version N (`vN/`) and its checkpoints; relative to csr.toml",
    },
}

# key -> (what it does, the paper's value, the released code's value); "" where neither says.
GENERATE = {
    "num_token_beams": ("sequences returned by the token-level diverse beam search per expansion", "5", "5"),
    "num_beam_groups": ("groups of the diverse beam search (Hamming diversity between groups)", "5", "5"),
    "diversity_penalty": ("Hamming diversity penalty between groups", "3.0", "3.0"),
    "max_new_tokens": ("most new tokens of one sentence; a cut sentence is expanded further",
                       "74 (appendix A.1)", "70 (`step1.sh`)"),
    "max_length": ("most tokens of a whole response (image and prompt not counted)", "1024", "1024"),
    "num_beams": ("active partial responses per search step: top ceil(k/2) + bottom floor(k/2)",
                  "5, \"the capacity of input at each search layer\"", "5, kept as top 1 + bottom 2"),
    "preset": ("`paper` or `reference-code`: the reward, the response score and the defaults below "
               "(README: Reward presets)", "paper", "reference-code"),
    "lam": ("lambda: weight of R_I in R(s) = lambda R_I + (1 - lambda) R_T", "0.9", "0.9 (`clip_alpha`)"),
    "select_by": ("selection key of the active set: `reward` (calibrated) or `text` (LM score)",
                  "reward", "text (`node.score`)"),
    "keep_rule": ("`paper` (top/bottom halves of num_beams) or `reference-code` (`[:k//2-1] + [-(k//2):]`)",
                  "paper", "reference-code"),
    "degenerate_rules": ("which degenerate-text rules exclude candidates: `csr` or `reference-code`",
                         "", "reference-code (`clean_tree`, `score.py`)"),
}

TRAIN = {
    "beta": ("DPO beta (the paper's alpha)", "0.1 (spec/CSR.md)", ""),
    "sft_weight": ("weight of an NLL term on the chosen response next to DPO (0: pure DPO). The demo uses 1.0: "
                   "on its pairs, which differ in a word, pure DPO lowered the chosen likelihood too and "
                   "raised hallucination (docs/demo-results.md)", "0", "0"),
    "lora_r": ("LoRA rank on the language model's linear layers", "", "128"),
    "lora_alpha": ("LoRA alpha", "", "256"),
    "lora_dropout": ("LoRA dropout", "", ""),
    "lora_target": ("`language_model` (the seven decoder projections) or a comma-separated list of layer names",
                    "", "the language model's linear layers"),
    "learning_rate": ("learning rate of the LoRA weights", "", "1e-7"),
    "projector_learning_rate": ("learning rate of the multimodal projector, trained in full (0 freezes it)",
                                "", "2e-5 (`mm_projector_lr`)"),
    "lr_scheduler": ("cosine, linear, constant or constant_with_warmup", "", "cosine"),
    "warmup_ratio": ("share of the steps spent warming up", "", "0.03"),
    "epochs": ("passes over the pairs", "", "1"),
    "batch_size": ("pairs per device and step", "", "1"),
    "grad_accum": ("gradient accumulation steps", "", "1"),
    "seed": ("seed of data order, LoRA initialisation and dropout", "", ""),
    "max_response_tokens": ("longest response DPO trains on, in response tokens (image and prompt on top); a longer "
                            "pair is never cut", "", "1024 in all (`model_max_length`, prompt included)"),
    "too_long": ("`skip` (leave out and count) or `refuse` a pair over max_response_tokens", "", ""),
    "reference": ("`tree` (the search's stored log-probs of pi_{N-1}, no reference forward pass), `recompute`, "
                  "or `auto`: the tree when the iteration was searched in float32", "", "recompute"),
    "report_to": ("TRL's log reporting: none, tensorboard or wandb", "", "wandb"),
    "logging_steps": ("steps between logged metrics", "", "1"),
    "save_steps": ("steps between checkpoints (a killed `csr train` resumes from the last)", "", "100"),
    "save_total_limit": ("checkpoints kept", "", "1"),
    "bf16": ("bf16 autocast: unset = on where CUDA supports it", "", "true"),
    "gradient_checkpointing": ("recompute activations to save memory", "", "true"),
    "save_dtype": ("dtype of the merged model's weights: float32, bfloat16 or float16 (a 7B version: 28 GB in "
                   "float32, 14 GB in bfloat16)", "", ""),
}


def _rows(config_cls, described: dict) -> list[str]:
    rows = ["| key | default | paper | released code | what it does |", "|---|---|---|---|---|"]
    for name, field in config_cls.model_fields.items():
        what, paper, released = described[name]
        default = field.default
        if default is None and name in PRESET_SEARCH_DEFAULTS["paper"]:
            default = " / ".join(f"{p}: {PRESET_SEARCH_DEFAULTS[p][name]}" for p in PRESET_SEARCH_DEFAULTS)
        shown = "unset" if default is None else f"`{default}`" if not isinstance(default, str) or " / " not in default \
            else default
        rows.append(f"| `{name}` | {shown} | {paper} | {released} | {what} |")
    return rows


# [self_reward]: (what it does, where the default comes from). The released code has no self-rewarding.
SELF_REWARD = {
    "samples": ("responses sampled per prompt; every two of them are judged once", "appendix A.1: two"),
    "temperature": ("sampling temperature", "Yuan et al. (self-rewarding LMs): 0.7"),
    "top_p": ("nucleus sampling mass (no top-k)", "Yuan et al.: 0.9"),
    "seed": ("seed of the study; each prompt draws with a seed derived from it, the policy version and "
             "the prompt, so a rerun or another worker draws the same samples", ""),
    "max_new_tokens": ("longest sampled response, in tokens", "LLaVA-1.5's evaluation length"),
    "judge_max_new_tokens": ("longest judge output, in tokens (the judge decodes greedily)", ""),
    "judge_prompt": ("the judge's prompt; must contain `{response 1}` and `{response 2}`",
                     "table 3, verbatim"),
    "judge_answers": ("what names Response 1 and Response 2 in the judge's output (case and spacing free; "
                      "an output that is only `1` or `2` counts too); an output naming both or neither gives "
                      "no verdict", "table 3's output format"),
}


def _self_reward_rows() -> list[str]:
    from csr.engine.self_reward import SelfRewardConfig

    rows = ["| key | default | source | what it does |", "|---|---|---|---|"]
    for name, field in SelfRewardConfig.model_fields.items():
        what, source = SELF_REWARD[name]
        shown = "table 3" if name == "judge_prompt" else f"`{field.default}`"
        rows.append(f"| `{name}` | {shown} | {source} | {what} |")
    return rows


def _location_rows() -> list[str]:
    rows = ["| key | default | what it does |", "|---|---|---|"]
    for section, described in LOCATIONS.items():
        for name, field in TABLES[section].model_fields.items():
            rows.append(f"| `[{section}] {name}` | `{field.default}` | {described[name]} |")
    return rows


def missing_keys() -> list[str]:
    described = {**LOCATIONS, "generate": GENERATE, "train": TRAIN, "self_reward": SELF_REWARD}
    return [f"[{section}] {name}" for section, table in TABLES.items()
            for name in table.model_fields if name not in described.get(section, {})]


def render() -> str:
    lines = [
        "# Settings reference",
        "",
        "Generated from the settings themselves by `python -m csr.engine.settings_reference`",
        "(tests/test_settings_reference.py fails when this page and the code differ).",
        "Each key goes in `csr.toml` under its section; a key the section does not know,",
        "or a value of the wrong type, is refused with one line naming the key.",
        "Empty cells: the source does not say. \"released code\" is github.com/YiyangZhou/CSR",
        "(`inference_csr/`, `scripts/run_train.sh`).",
        "",
        "## `[store]`, `[model]`, `[paths]`: where things are (`csr init` writes them)",
        "",
        *_location_rows(),
        "",
        "## `[generate]`: the search (`csr generate`, `csr iterate`)",
        "",
        "A preset fills `max_new_tokens`, `select_by`, `keep_rule` and `degenerate_rules` when they are",
        "left unset; flags: `--preset`, `--lambda`, `--select-by`, `--dtype`, `--kv-budget`.",
        "",
        *_rows(SearchConfig, GENERATE),
        "",
        "## `[train]`: DPO with LoRA (`csr train`, `csr iterate`)",
        "",
        "Flags: `--device`, `--report-to`, `--pair-set`. Loss: sigmoid DPO (eq. 1, 5), the reference",
        "model is version N-1 (the adapter switched off, or the tree's log-probs).",
        "",
        *_rows(TrainConfig, TRAIN),
        "",
        "## `[self_reward]`: the self-rewarding baseline (`csr generate --method self-reward`)",
        "",
        "Per prompt, the policy samples `samples` responses and judges every two with the paper's",
        "table 3 prompt; curation takes the most and the least preferred (README: Baselines).",
        "",
        *_self_reward_rows(),
        "",
        "## Evaluation",
        "",
        "`csr eval chair` and `csr eval pope` take their settings as options, recorded with each",
        "evaluation (docs/evaluation.md states each default and where it comes from).",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    print(render(), end="")
