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
        "url": "the store: a database URL (postgresql://..., sqlite:///PATH), or a bare path for SQLite; a relative SQLite path is relative "
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
    "max_length": ("most of a whole response, in `max_length_unit`", "1024", "1024"),
    "max_length_unit": ("what max_length counts: `response-tokens` (image and prompt not counted) or `characters`: "
                        "`len(decode(prompt ids + response ids))`, the prompt tokenised as text with one image token",
                        "", "characters (`len(tokenizer.decode(outputs.sequences[j])) >= max_length`)"),
    "num_beams": ("active partial responses per search step: top ceil(k/2) + bottom floor(k/2)",
                  "5, \"the capacity of input at each search layer\"", "5, kept as top 1 + bottom 2"),
    "preset": ("`paper` or `reference-code`: the reward, the response score and the defaults below "
               "(docs/presets.md)", "paper", "reference-code"),
    "lam": ("lambda: weight of R_I in R(s) = lambda R_I + (1 - lambda) R_T", "0.9", "0.9 (`clip_alpha`)"),
    "select_by": ("selection key of the active set. The paper (algorithm 1) keeps \"the top-k and bottom-k "
                  "sentences with the highest and lowest reward scores\", which reads two ways: `reward`, the "
                  "path's cumulative response score (csr's reading), or `sentence-reward`, the candidate's own "
                  "R(s); `text` is the path's sum of penalised beam scores (LM score only)",
                  "reward or sentence-reward", "text (`node.score`)"),
    "keep_rule": ("`paper` (top/bottom halves of num_beams) or `reference-code` (`[:k//2-1] + [-(k//2):]`)",
                  "paper", "reference-code"),
    "degenerate_rules": ("which degenerate-text rules exclude candidates: `csr` or `reference-code` (too short: "
                         "`len(clean_text(text.strip())) < 4`)",
                         "", "reference-code (`clean_tree`, `score.py`)"),
    "prune_degenerate": ("`before-select`: a degenerate candidate takes no place in the active set; `after-search`: "
                         "it takes its place and is expanded, and its subtree is excluded (`degenerate_ancestor`)",
                         "", "after-search (`clean_tree`, `score.py` run on the searched tree)"),
    "prompt_template": ("the prompt, in search and in training: `chat` (the processor's chat template; the hub's "
                        "llava-1.5 one has no system sentence) or `llava-v1` (LLaVA's `conv_vicuna_v1`: \"A chat "
                        "between a curious user and an artificial intelligence assistant. ...\" then "
                        "` USER: <image>\\n{prompt} ASSISTANT:`). The paper names none; `chat` serves every "
                        "architecture", "", "llava-v1 (`conv_templates['v1']`, `--version v1`)"),
    "eos_rule": ("`stop`: EOS ends the sentence and the response; `contained`: EOS stops nothing and a candidate "
                 "holding it anywhere is final", "", "contained (`eos_token_id=period_id`)"),
    "sentence_end": ("`full-stops`: every id that decodes to \".\" alone; `period-token`: the one id of the token "
                     "\".\"", "", "period-token (`--period_id 29889`)"),
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
    "unencodable": ("`skip` (leave out, name and count) or `refuse` a pair the model cannot train on: a response "
                    "holding an image placeholder id or an id outside the vocabulary, or an image the processor "
                    "cannot encode", "", "(fails the run)"),
    "reference": ("`tree` (the search's stored log-probs of pi_{N-1}, no reference forward pass), `recompute`, "
                  "or `auto`: the tree when the iteration recorded float32 (`csr generate --dtype float32`), "
                  "else recompute", "", "recompute"),
    "report_to": ("TRL's log reporting: none, tensorboard or wandb", "", "wandb"),
    "logging_steps": ("steps between logged metrics", "", "1"),
    "save_steps": ("steps between checkpoints (a killed `csr train` resumes from the last)", "", "100"),
    "save_total_limit": ("checkpoints kept", "", "1"),
    "bf16": ("bf16 autocast: unset = on where CUDA supports it", "", "true"),
    "gradient_checkpointing": ("recompute activations to save memory", "", "true"),
    "forward": ("how a pair goes through the model: `prefix-shared` (the prompt and image once, chosen and "
                "rejected both attending to it; arXiv 2410.20305), `concatenated` (TRL's two rows, each with the "
                "whole prompt), or `auto`: prefix-shared where the architecture supports it (LLaVA, LLaVA-NeXT). Same loss and "
                "gradients within float tolerance (docs/performance.md)", "", "concatenated (TRL)"),
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
        "A preset fills every key whose default names both presets when it is left unset. The resolved",
        "values are recorded with the iteration; `prompt_template`, `eos_rule`, `max_length_unit`,",
        "`prune_degenerate` and `sentence_end` are left out of the record where they have the value the",
        "search had before they existed (`paper`'s), which is also how a record without them reads back:",
        "iterations recorded before keep their settings and their hash. Flags: `--preset`, `--lambda`,",
        "`--select-by`, `--dtype`, `--kv-budget`.",
        "",
        *_rows(SearchConfig, GENERATE),
        "",
        "Where `reference-code` still is not the release, and why:",
        "",
        "- `characters`: the release decodes `outputs.sequences[j]`, which holds the padding of a beam that",
        "  ended early and, with a processor that expands the image, 576 image tokens; csr decodes the prompt",
        "  as text (one image token) and the response's own ids.",
        "- score.py reads a sentence as `text[len(parent_text) + 3:]` of decoded strings; csr takes the exact",
        "  increment of the decoded response (`engine/text.py`).",
        "- construct.py stores the whole search prompt as the human turn, which the training script wraps in",
        "  the v1 template a second time; csr trains on the prompt the search used, once.",
        "- ties and equal texts in curation: `csr curate` (storage/curation.py).",
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
