"""CSR's sentence-level beam search (section 3.2.1, algorithm 1, appendix A.1),
on top of a token-level diverse (group) beam search that we implement
ourselves, batched and with the KV cache.

Layers, bottom up, one module each:

- engine/search/beam_search.py, `group_beam_search`: the token-level algorithm on
  logits only, several parents side by side, a `step` callback running the model;
- engine/search/expansion.py, `PromptPrefix` / `expand_partials` / `expand_prompts`:
  the prompt run once, then all partials x beams of one or several prompts
  advanced in one forward pass per token, the prefix KV held once per prompt
  (engine/search/cascade_attention.py, engine/search/kv_cache.py);
- here, `sentence_search_steps`: the tree of sentences, rewards and
  selection as a generator that yields what it needs expanded, with CLIP
  behind a callable (engine/search/batch_search.py steps many of them in
  one loop); `run_sentence_search` drives one with the model behind a
  callable (the benchmark plugs the released-code-style one into the very
  same tree logic), and `sentence_beam_search` searches one prompt.

Where the token-level search departs from transformers 4.x group beam search
(none of these changes the one-group result, which the tests compare with
transformers 5 `generate`): early stopping tests the best *running* beam
against the worst finished one, as v5 does; a group that is done takes no
more rows and adds nothing to the diversity penalty of later groups.

The decisions where the paper is silent are recorded in
engine/search/sentence_level.py's docstring (and in spec/CSR.md terms).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator
from dataclasses import dataclass

import torch

from csr.engine import rewards
from csr.engine.search.beam_search import BeamSettings, TokenBeam
from csr.engine.search.config import SearchConfig
from csr.engine.search.expansion import ExpandStats, PromptPrefix, expand_partials
from csr.engine.search.records import SearchResult
from csr.engine.search.sentence_level import (
    PartialResponse,
    make_candidates,
    score_level,
    select_active,
)

ExpandFn = Callable[[list[list[int]], list[int]], list[list[TokenBeam]]]
# texts -> CLIP's 100 * cos for each (not clipped: the released image rank uses it raw).
ScoreFn = Callable[[list[str]], list[float]]


def search_beam_settings(policy, config: SearchConfig) -> BeamSettings:
    """The token-level search's stops under `sentence_end` and `eos_rule`."""
    if config.sentence_end == "period-token":
        from csr.engine.loading import period_token_id

        ends: tuple[int, ...] = (period_token_id(policy.tokenizer),)
    else:
        ends = tuple(policy.sentence_end_ids)
    # "contained": EOS is an ordinary token to the token-level search.
    eos = policy.eos_token_id if config.eos_rule == "stop" else None
    return BeamSettings(
        eos_token_id=eos,
        sentence_end_ids=ends,
        masked_ids=tuple(getattr(policy, "masked_ids", ())),
        **config.beam_settings_kwargs,
    )


def _length_reached(policy, config: SearchConfig, user_prompt: str) -> Callable[[list[int]], bool]:
    """Whether a response (its ids) has reached `max_length`."""
    if config.max_length_unit == "response-tokens":
        return lambda tokens: len(tokens) >= config.max_length
    # The released code: len(tokenizer.decode(outputs.sequences[j])) >= max_length,
    # the sequence being the prompt's ids (its processor did not expand the image) and the response.
    prompt_ids = list(policy.tokenizer(policy.build_prompt(user_prompt, config.prompt_template)).input_ids)
    return lambda tokens: (len(tokens) >= config.max_length
                           or len(policy.tokenizer.decode(prompt_ids + list(tokens))) >= config.max_length)


# What a search asks of the model at each depth: the partial responses (token ids)
# and each one's cap on new tokens; what it is sent back: each partial's candidates.
ExpandRequest = tuple[list[list[int]], list[int]]


@dataclass(frozen=True)
class ScoreRequest:
    """What a search asks of CLIP at each depth: 100 cos of each text against its image."""

    texts: list[str]


SearchSteps = Generator[ExpandRequest | ScoreRequest, list[list[TokenBeam]] | list[float], "SearchResult"]


def sentence_search_steps(policy, config: SearchConfig, user_prompt: str = "") -> SearchSteps:
    """The sentence-level beam search tree as a generator, one depth a step.

    At each depth it yields what it needs expanded (partials, caps) and is
    sent back the candidates per partial, then yields the texts CLIP must
    score (a ScoreRequest, when there are any) and is sent back their raw
    100 cos; it returns the finished SearchResult. So one loop can step many
    prompts' trees together, the model and CLIP each in one batch for all
    (`batch_search`), and both stay outside the tree logic. `user_prompt` is
    needed only when max_length counts characters. See the module docstring
    for the decisions it makes. `stats.model_seconds` and `clip_seconds` are
    the time spent away from the tree, shared with whatever else the driver
    ran in the same batch."""
    started = time.perf_counter()
    result = SearchResult(records=[])
    at_length = _length_reached(policy, config, user_prompt)
    stats = result.stats
    active = [PartialResponse(None, [], "")]
    depth = 0
    while active:
        stats.max_active = max(stats.max_active, len(active))
        caps = [min(config.max_new_tokens, config.max_length - len(p.tokens)) for p in active]
        t0 = time.perf_counter()
        expansions = yield [p.tokens for p in active], caps
        t1 = time.perf_counter()
        stats.model_seconds += t1 - t0
        level = make_candidates(policy, config, active, expansions, depth, result, at_length)
        clip_texts = [c.clip_text for c in level if c.clip_text]
        t2 = time.perf_counter()
        raw_scores = iter((yield ScoreRequest(clip_texts)) if clip_texts else [])
        stats.clip_seconds += time.perf_counter() - t2
        stats.clip_calls += 1 if clip_texts else 0
        for c in level:
            c.clip_raw = next(raw_scores) if c.clip_text else 0.0
            c.record.r_i = rewards.clip_reward(c.clip_raw)
        score_level(config, level)
        active = select_active(config, level, result)
        stats.depths += 1
        depth += 1
    stats.candidates = len(result.records)
    stats.finals = len(result.responses)
    stats.total_seconds = time.perf_counter() - started
    return result


def run_sentence_search(
    policy, config: SearchConfig, expand: ExpandFn, score: ScoreFn, user_prompt: str = ""
) -> SearchResult:
    """One prompt's search tree with the model behind `expand` (partials,
    caps -> candidates per partial) and CLIP behind `score` (texts -> 100 cos):
    `sentence_search_steps` driven alone."""
    steps = sentence_search_steps(policy, config, user_prompt)
    request = next(steps)
    while True:
        reply = score(request.texts) if isinstance(request, ScoreRequest) else expand(*request)
        try:
            request = steps.send(reply)
        except StopIteration as done:
            return done.value


def sentence_beam_search(
    policy,
    clip,
    image,
    prompt_text: str,
    config: SearchConfig,
    image_embedding: torch.Tensor | None = None,
    max_rows: int | None = None,
) -> SearchResult:
    """Run CSR's sentence-level beam search for one (image, prompt).

    The prompt prefix runs through the model once; the CLIP image embedding
    is computed once (or passed in, e.g. cached per image by the worker).
    Returns every candidate generated (`result.records`), degenerate ones
    included with their exclusion reason.
    """
    settings = search_beam_settings(policy, config)
    t0 = time.perf_counter()
    prefix = PromptPrefix(policy, image, prompt_text, config.prompt_template)
    if image_embedding is None:
        image_embedding = clip.encode_image(image)
    prefix_seconds = time.perf_counter() - t0
    expand_stats = ExpandStats()

    def expand(partials: list[list[int]], caps: list[int]) -> list[list[TokenBeam]]:
        return expand_partials(prefix, partials, caps, settings, max_rows, expand_stats)

    def score(texts: list[str]) -> list[float]:
        return clip.raw_scores(image_embedding, texts)

    result = run_sentence_search(policy, config, expand, score, prompt_text)
    result.stats.forward_passes = expand_stats.forward_passes + prefix.forward_passes
    result.stats.rows_forwarded = expand_stats.rows_forwarded + prefix.length
    result.stats.model_seconds += prefix_seconds
    result.stats.total_seconds += prefix_seconds
    return result
