"""The self-rewarding baseline (Yuan et al.; paper appendix A.1 and table 3).

For each prompt the current model samples `samples` responses (temperature,
top-p and a per-prompt seed), then judges every two of them with the paper's
table 3 prompt: it is shown the image and the prompt with both responses and
answers "response 1" or "response 2". A response's reward is the number of
judgements it won; curation (storage/self_reward_curation.py) takes the most
and the least preferred as the pair.

The samples are stored as a one-level tree: each is a final candidate (no
parent) with its response row, token ids and log pi_{N-1}, so curation, the
trainer, export and analytics read them as they read the search's responses.
Every judgement is stored with the prompt it was given, its whole output and
its parsed verdict or why none could be parsed (`judgements`).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from enum import StrEnum
from itertools import combinations
from typing import Any, ClassVar

from pydantic import Field, field_validator

from csr.engine.rewards import clip_reward, text_probability
from csr.engine.settings_table import Number, SettingsTable
from csr.engine.text import portable


class Method(StrEnum):
    """How an iteration makes its pairs (`csr generate --method`)."""

    csr = "csr"
    self_reward = "self-reward"

# Paper table 3, verbatim (the two placeholders are filled with the responses).
JUDGE_PROMPT = (
    "Now you act as a judge, helping me determine which of the two texts I provide is closer to the given "
    "image and has fewer errors.\n"
    "*****************************************************************************\n"
    "Response 1:\n"
    "{response 1}\n"
    "Response 2:\n"
    "{response 2}\n"
    "*****************************************************************************\n"
    "Please strictly follow the following format requirements when outputting, and don\u2019t have any other "
    "unnecessary words.\n"
    "Output Format:\n"
    "response 1 or response 2."
)
PLACEHOLDERS = ("{response 1}", "{response 2}")
ANSWERS = ("response 1", "response 2")
_PLACEHOLDER = re.compile(r"\{response ([12])\}")


class SelfRewardConfig(SettingsTable):
    """[self_reward]: how the baseline samples and judges. Sampling defaults
    are Yuan et al.'s (T = 0.7, top-p 0.9); the judge decodes greedily."""

    noun: ClassVar[str] = "self-reward setting"

    samples: int = Field(2, ge=2)
    temperature: Number = Field(0.7, gt=0)
    top_p: Number = Field(0.9, gt=0, le=1)
    seed: int = Field(0, ge=0)
    max_new_tokens: int = Field(512, gt=0)
    judge_max_new_tokens: int = Field(16, gt=0)
    judge_prompt: str = JUDGE_PROMPT
    # What names Response 1 and Response 2 in the judge's output (table 3's output format).
    judge_answers: list[str] = Field(default_factory=lambda: list(ANSWERS))

    @field_validator("judge_answers")
    @classmethod
    def _two_distinct_answers(cls, value: list[str]) -> list[str]:
        if len(value) != 2 or not all(a.strip() for a in value) or _norm(value[0]) == _norm(value[1]):
            raise ValueError("self-reward setting judge_answers must be two different, non-empty strings")
        return value

    @field_validator("judge_prompt")
    @classmethod
    def _has_both_placeholders(cls, value: str) -> str:
        missing = [p for p in PLACEHOLDERS if p not in value]
        if missing:
            raise ValueError(f"self-reward setting judge_prompt must contain {' and '.join(missing)}")
        return value


@dataclass(frozen=True)
class SelfRewardRun:
    """What a worker of a self-rewarding iteration needs besides the models."""

    config: SelfRewardConfig
    policy_version: int


def iteration_config(store, iteration: int, settings: dict,
                     source: str = "[self_reward] settings") -> tuple[str, dict]:
    """What a self-rewarding iteration freezes: its method, its sampling and
    judge settings, and the models. Returns (the iteration's preset column, config)."""
    from csr.engine.errors import CsrError, SettingsError

    try:
        config = SelfRewardConfig.from_dict(settings)
    except SettingsError as exc:
        raise CsrError(f"{source}: {exc}") from exc
    from csr.engine.worker_loop import models_config

    return Method.self_reward.value, {
        "method": Method.self_reward.value,
        "self_reward": config.to_dict(),
        **models_config(store, iteration),
    }


def judge_prompt(template: str, first: str, second: str) -> str:
    """The template with its two placeholders filled in one pass (a response
    that itself contains a placeholder is not filled again)."""
    texts = {"1": first, "2": second}
    return _PLACEHOLDER.sub(lambda m: texts[m.group(1)], template)


def _norm(answer: str) -> str:
    return " ".join(answer.lower().split())


def _answer_pattern(answer: str) -> re.Pattern:
    # Case and spacing free ("Response 1", "response1"), not inside a longer word or number.
    words = [re.escape(w) for w in answer.lower().split()]
    return re.compile(r"(?<![0-9a-z])" + r"\s*".join(words) + r"(?![0-9a-z])", re.IGNORECASE)


def parse_verdict(output: str, answers: tuple[str, str] | list[str] = ANSWERS) -> tuple[int | None, str | None]:
    """(1 or 2, None) when the judge's output names exactly one of the two
    answers (or is just "1" or "2"), else (None, why)."""
    text = output.strip()
    if not text:
        return None, "empty output"
    if text.rstrip(".").strip() in ("1", "2"):
        return int(text.rstrip(".").strip()), None
    named = [n for n, answer in enumerate(answers, start=1) if _answer_pattern(answer).search(text)]
    if len(named) == 1:
        return named[0], None
    if named:
        return None, "names both responses"
    return None, "names neither response"


def sample_seed(seed: int, policy_version: int, prompt_id: int) -> int:
    """One prompt's sampling seed: the same prompt draws the same samples when
    rerun (resumption, another worker), another iteration draws new ones."""
    digest = hashlib.sha256(f"{seed}|{policy_version}|{prompt_id}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


@dataclass(frozen=True)
class Sample:
    token_ids: list[int]
    text: str
    logprob_sum: float
    ended: bool  # the model ended it (EOS), rather than max_new_tokens


@dataclass(frozen=True)
class Verdict:
    first: int
    second: int
    prompt: str
    output: str
    output_token_ids: list[int]
    verdict: int | None
    parse_error: str | None


def draw_samples(policy, image, prompt: str, config: SelfRewardConfig, seed: int) -> list[Sample]:
    """`config.samples` responses sampled from the policy, each with its exact
    log pi (the raw logits, before temperature and top-p: the DPO reference)."""
    import torch

    inputs = policy.encode(image, prompt)
    prompt_length = inputs["input_ids"].shape[1]
    torch.manual_seed(seed)
    with torch.inference_mode():
        out = policy.model.generate(
            **inputs,
            do_sample=True,
            temperature=float(config.temperature),
            top_p=float(config.top_p),
            top_k=0,
            num_return_sequences=config.samples,
            max_new_tokens=config.max_new_tokens,
            eos_token_id=policy.eos_token_id,
            pad_token_id=_pad_id(policy),
            # As the search: never an id training cannot take back as text (the image placeholder).
            suppress_tokens=list(getattr(policy, "masked_ids", ())) or None,
            return_dict_in_generate=True,
            output_logits=True,
        )
    generated = out.sequences[:, prompt_length:]
    logprobs = torch.stack([step.float().log_softmax(-1) for step in out.logits], dim=1)
    samples = []
    for row in range(generated.shape[0]):
        ids = generated[row].tolist()
        ended = policy.eos_token_id in ids
        if ended:
            ids = ids[: ids.index(policy.eos_token_id) + 1]
        positions = torch.arange(len(ids))
        total = logprobs[row, positions, torch.tensor(ids, dtype=torch.long)].sum().item() if ids else 0.0
        samples.append(Sample(ids, portable(policy.decode(ids)), float(total), ended))
    return samples


def judge(policy, image, samples: list[Sample], config: SelfRewardConfig) -> list[Verdict]:
    """Every two samples judged once (greedy decoding), the earlier one as Response 1."""
    import torch

    verdicts = []
    for first, second in combinations(range(len(samples)), 2):
        shown = judge_prompt(config.judge_prompt, samples[first].text, samples[second].text)
        inputs = policy.encode(image, shown)
        with torch.inference_mode():
            out = policy.model.generate(
                **inputs,
                do_sample=False,
                max_new_tokens=config.judge_max_new_tokens,
                eos_token_id=policy.eos_token_id,
                pad_token_id=_pad_id(policy),
            )
        ids = out[0, inputs["input_ids"].shape[1]:].tolist()
        if policy.eos_token_id in ids:
            ids = ids[: ids.index(policy.eos_token_id) + 1]
        output = portable(policy.decode(ids))
        verdict, why = parse_verdict(output, config.judge_answers)
        verdicts.append(Verdict(first, second, shown, output, ids, verdict, why))
    return verdicts


def tree_of(samples: list[Sample], verdicts: list[Verdict], clip_scores: list[float], seed: int):
    """The samples as a one-level tree (storage/trees.py rows) with the judgements.
    A candidate's reward is the number of judgements it won."""
    from csr.storage import Tree

    wins = [0] * len(samples)
    for v in verdicts:
        if v.verdict is not None:
            wins[v.first if v.verdict == 1 else v.second] += 1
    candidates, responses = [], []
    for node, (sample, score) in enumerate(zip(samples, clip_scores, strict=True)):
        r_t, r_i = text_probability(sample.logprob_sum), clip_reward(score)
        candidates.append({
            "node": node, "parent_node": None, "depth": 0, "sibling_index": node, "text": sample.text,
            "token_count": len(sample.token_ids), "logprob_sum": sample.logprob_sum, "r_t": r_t, "r_i": r_i,
            "reward": float(wins[node]), "cumulative_reward": float(wins[node]), "is_final": True,
            "is_kept": True, "exclusion_reason": None,
            "finish_reason": "eos" if sample.ended else "max_new_tokens",
            "token_ids": list(sample.token_ids), "beam_score": None, "text_rank": None, "image_rank": None,
        })
        responses.append({
            "leaf_node": node, "text": sample.text, "token_ids": list(sample.token_ids),
            "token_count": len(sample.token_ids), "sentence_count": 1, "logprob_sum": sample.logprob_sum,
            "r_t_sum": r_t, "r_i_sum": r_i, "text_rank_sum": 0.0, "image_rank_sum": 0.0,
            "is_truncated": not sample.ended,
        })
    judgements = [
        {"first_node": v.first, "second_node": v.second, "sample_seed": seed, "judge_prompt": v.prompt,
         "output": v.output, "output_token_ids": v.output_token_ids, "verdict": v.verdict,
         "parse_error": v.parse_error}
        for v in verdicts
    ]
    return Tree(candidates, responses, judgements)


def sample_and_judge(policy, clip, image, embedding, prompt: str, prompt_id: int, config: SelfRewardConfig,
                     policy_version: int):
    """One prompt's whole self-rewarding step: its tree with the judgements."""
    seed = sample_seed(config.seed, policy_version, prompt_id)
    samples = draw_samples(policy, image, prompt, config, seed)
    verdicts = judge(policy, image, samples, config)
    scores = clip.raw_scores(embedding, [s.text for s in samples])
    return tree_of(samples, verdicts, scores, seed)


def _pad_id(policy) -> Any:
    pad = policy.tokenizer.pad_token_id
    return policy.eos_token_id if pad is None else pad
