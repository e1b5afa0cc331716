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

Decisions where the paper is silent (recorded here and in spec/CSR.md terms):

- A sentence ends at a full-stop token, at EOS, or after `max_new_tokens`; a
  sentence cut by `max_new_tokens` is not final and is expanded further, as
  in the released code. Full stop (`sentence_end`): every id that decodes to
  "." alone (`Policy.sentence_end_ids`, "full-stops") or the one id of the
  token "." ("period-token", the released `--period_id 29889`).
- `eos_rule="stop"`: EOS ends the sentence and the response.
  `eos_rule="contained"` (released code, which passes the period id as
  `eos_token_id`): EOS stops nothing, and a candidate that holds it anywhere
  is final (finish reason "eos"); its text is the decode without it.
- `max_length` (`max_length_unit="response-tokens"`) bounds the *response* in
  tokens (prompt and image tokens not counted, so the setting does not depend
  on the model's image-token count). Each expansion gets
  min(max_new_tokens, max_length - response length) new tokens; a candidate
  whose response reaches max_length is final. `"characters"` (released code):
  final once `len(tokenizer.decode(prompt ids + response ids))` reaches
  max_length, the prompt tokenised as text (one image token, BOS, special
  tokens decoded as written); the token bound stays as a backstop.
- A response ends when a candidate finishes with EOS. A candidate that is
  only EOS (no visible text, e.g. "</s>" right after a full stop) is an *end
  marker*: final, kept, r_i = 0, reward 0, and it does not count as a
  sentence (cumulative reward = its parent's). At depth 0 it would be an
  empty response and is excluded ("empty_response").
- Final candidates do not take a place in the active set (as in the released
  code); every non-excluded final is kept for curation (`is_kept`) and becomes
  a `ResponseRecord`: its exact text, token ids and the sums curation needs.
- Active set (`keep_rule="paper"`): at most `num_beams` (k) partial responses,
  "the capacity of input at each search layer" (appendix A.1): from the
  non-final, non-excluded candidates of a depth, the top ceil(k/2) and the
  bottom floor(k/2) by the selection key; all of them when there are at most
  k. `keep_rule="reference-code"` reproduces the released code's slicing
  (`[:k//2 - 1] + [-(k//2):]` when there are at least k).
- Selection key: the paper's algorithm 1 keeps "the top-k and bottom-k
  sentences with the highest and lowest reward scores", which reads two ways:
  `select_by="reward"` (paper preset) ranks by the path's cumulative response
  score under the preset, `select_by="sentence-reward"` by the candidate's
  own R(s); `select_by="text"` (released code) by the path's sum of
  penalised beam scores (its `node.score`).
- The preset picks the settings of PRESET_SEARCH_DEFAULTS unless they are set.
- Degenerate candidates (`csr.engine.search.degenerate`) are stored with their
  reason and are never final. `prune_degenerate="before-select"`: they are
  never expanded. `"after-search"` (released code, which prunes the finished
  tree): they take their place in the active set like any candidate and are
  expanded, and every descendant is stored with exclusion_reason
  "degenerate_ancestor" and never becomes a response. Under csr's rules, a candidate whose
  stripped text equals an earlier non-excluded sibling's is stored with
  exclusion_reason "duplicate" and not expanded (group beam search can return
  the same sentence from two groups); the released rules keep it.
- Sibling ranks (text rank on the penalised beam score, image rank on 100 cos)
  are taken among the non-excluded, non-end-marker siblings, and stored under
  both presets. R_T uses the raw model log-probs of the sentence tokens (EOS
  included when it ended the sentence).
- Text of a candidate: the increment of the decoded response
  (`csr.engine.text`), so that concatenating a path's texts gives the decoded
  response, except where the decode rewrote a parent's text (flagged
  `text_exact = False`); a response's text is always the decode of its ids.
  CLIP and the degenerate filters see a candidate's text stripped.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator
from dataclasses import dataclass, field

import torch

from csr.engine import rewards
from csr.engine import text as stored_text
from csr.engine.search import degenerate
from csr.engine.search.beam_search import (  # noqa: F401  (re-exported: callers import the search's names from here)
    _NEG,
    EOS,
    MAX_LENGTH,
    MAX_NEW_TOKENS,
    SENTENCE_END,
    BeamSettings,
    TokenBeam,
    group_beam_search,
)
from csr.engine.search.config import (  # noqa: F401
    KEEP_RULES,
    PRESET_SEARCH_DEFAULTS,
    SELECT_BY,
    SearchConfig,
)
from csr.engine.search.expansion import (  # noqa: F401
    ATTENTION,
    ExpandStats,
    PromptPrefix,
    expand_partials,
    expand_prompts,
)
from csr.engine.search.kv_cache import (  # noqa: F401
    CascadeRows,
    _assign_slots,
    _buffer_cache,
    _BufferLayer,
    _CachedRows,
    _is_plain_cache,
)

EMPTY_RESPONSE = "empty_response"
DUPLICATE = "duplicate"
DEGENERATE_ANCESTOR = "degenerate_ancestor"

# --------------------------------------------------------------------------- sentence level


@dataclass
class CandidateRecord:
    """One candidate sentence of one prompt's search tree (a `candidates` row)."""

    node: int
    parent_node: int | None
    depth: int
    sibling_index: int
    text: str
    token_count: int
    logprob_sum: float
    r_t: float
    r_i: float
    reward: float
    cumulative_reward: float
    is_final: bool
    is_kept: bool
    exclusion_reason: str | None
    finish_reason: str | None = None
    token_ids: list[int] = field(default_factory=list)
    # The diversity-penalised, length-normalised score the token search ranked it by.
    beam_score: float | None = None
    # 1 - rank among the scored siblings (None for end markers and excluded candidates).
    text_rank: float | None = None
    image_rank: float | None = None
    # False when `text` is only approximately what the tokens added (csr.engine.text).
    text_exact: bool = True


@dataclass
class ResponseRecord:
    """One final response of a tree (a `responses` row): its whole path, summed."""

    leaf_node: int
    text: str
    token_ids: list[int]
    sentence_count: int
    logprob_sum: float
    r_t_sum: float
    r_i_sum: float
    text_rank_sum: float
    image_rank_sum: float
    is_truncated: bool

    @property
    def token_count(self) -> int:
        return len(self.token_ids)

    def score(self, preset: str, lam: float) -> float:
        return rewards.response_score(
            preset,
            lam,
            sentences=self.sentence_count,
            r_t_sum=self.r_t_sum,
            r_i_sum=self.r_i_sum,
            text_rank_sum=self.text_rank_sum,
            image_rank_sum=self.image_rank_sum,
        )


@dataclass
class SearchStats:
    depths: int = 0
    candidates: int = 0
    finals: int = 0
    max_active: int = 0
    forward_passes: int = 0
    rows_forwarded: int = 0
    clip_calls: int = 0
    model_seconds: float = 0.0
    clip_seconds: float = 0.0
    total_seconds: float = 0.0


@dataclass
class SearchResult:
    records: list[CandidateRecord]
    responses: list[ResponseRecord] = field(default_factory=list)
    stats: SearchStats = field(default_factory=SearchStats)

    @property
    def token_ids(self) -> list[list[int]]:
        """Response token ids of each candidate's own sentence, indexed by node."""
        return [r.token_ids for r in self.records]


@dataclass
class _Path:
    """A partial (or final) response: the sums a response row needs, so far."""

    node: int | None
    tokens: list[int]
    settled: str  # raw decode of `tokens` that later tokens cannot change (all of it once final)
    sentences: int = 0
    logprob_sum: float = 0.0
    r_t_sum: float = 0.0
    r_i_sum: float = 0.0
    text_rank_sum: float = 0.0
    image_rank_sum: float = 0.0
    beam_path: float = 0.0  # the released code's node.score: sum of penalised beam scores
    pruned: bool = False  # a degenerate candidate holding a place (prune_degenerate="after-search")

    def score(self, config: SearchConfig) -> float:
        return rewards.response_score(
            config.preset,
            config.lam,
            sentences=self.sentences,
            r_t_sum=self.r_t_sum,
            r_i_sum=self.r_i_sum,
            text_rank_sum=self.text_rank_sum,
            image_rank_sum=self.image_rank_sum,
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
    active = [_Path(None, [], "")]
    depth = 0
    while active:
        stats.max_active = max(stats.max_active, len(active))
        caps = [min(config.max_new_tokens, config.max_length - len(p.tokens)) for p in active]
        t0 = time.perf_counter()
        expansions = yield [p.tokens for p in active], caps
        t1 = time.perf_counter()
        stats.model_seconds += t1 - t0
        level = _make_candidates(policy, config, active, expansions, depth, result, at_length)
        clip_texts = [c.clip_text for c in level if c.clip_text]
        t2 = time.perf_counter()
        raw_scores = iter((yield ScoreRequest(clip_texts)) if clip_texts else [])
        stats.clip_seconds += time.perf_counter() - t2
        stats.clip_calls += 1 if clip_texts else 0
        for c in level:
            c.clip_raw = next(raw_scores) if c.clip_text else 0.0
            c.record.r_i = rewards.clip_reward(c.clip_raw)
        _score_level(config, level)
        active = _select(config, level, result)
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


@dataclass
class _Candidate:
    record: CandidateRecord
    parent: _Path
    path: _Path
    clip_text: str
    end_marker: bool
    clip_raw: float = 0.0

    @property
    def eligible(self) -> bool:
        return self.record.exclusion_reason is None and not self.end_marker


def _make_candidates(policy, config, active, expansions, depth, result, at_length) -> list[_Candidate]:
    level: list[_Candidate] = []
    for parent, beams in zip(active, expansions, strict=True):
        seen: set[str] = set()
        for sibling, beam in enumerate(beams):
            tokens = parent.tokens + beam.token_ids
            reason = beam.finish_reason
            if config.eos_rule == "contained" and policy.eos_token_id in beam.token_ids:
                reason = EOS
            at_limit = at_length(tokens)
            if at_limit and reason == MAX_NEW_TOKENS:
                reason = MAX_LENGTH
            is_final = reason == EOS or at_limit
            decoded = policy.decode(tokens)
            step = stored_text.increment(parent.settled, decoded, is_final)
            text = stored_text.portable(step.text)
            stripped = text.strip()
            end_marker = reason == EOS and stored_text.is_blank(text)
            if end_marker:
                exclusion = EMPTY_RESPONSE if depth == 0 else None
            else:
                exclusion = degenerate.reason_for(config.degenerate_rules, text)
            if parent.pruned and exclusion is None:
                exclusion = DEGENERATE_ANCESTOR
            # csr's rules: group beam search can return one sentence from two
            # groups; the released code keeps both.
            if exclusion is None and config.degenerate_rules == "csr":
                if stripped in seen:
                    exclusion = DUPLICATE
                seen.add(stripped)
            logprob_sum = beam.logprob_sum
            record = CandidateRecord(
                node=len(result.records),
                parent_node=parent.node,
                depth=depth,
                sibling_index=sibling,
                text=text,
                token_count=len(beam.token_ids),
                logprob_sum=logprob_sum,
                r_t=rewards.text_probability(logprob_sum),
                r_i=0.0,
                reward=0.0,
                cumulative_reward=0.0,
                is_final=is_final,
                is_kept=False,
                exclusion_reason=exclusion,
                finish_reason=reason,
                token_ids=list(beam.token_ids),
                beam_score=float(beam.score),
                text_exact=step.exact,
            )
            result.records.append(record)
            path = _Path(
                node=record.node,
                tokens=tokens,
                settled=decoded if is_final else stored_text.settled(decoded),
                sentences=parent.sentences,
                logprob_sum=parent.logprob_sum + logprob_sum,
                r_t_sum=parent.r_t_sum,
                r_i_sum=parent.r_i_sum,
                text_rank_sum=parent.text_rank_sum,
                image_rank_sum=parent.image_rank_sum,
                beam_path=parent.beam_path + float(beam.score),
                pruned=exclusion is not None,
            )
            level.append(_Candidate(record, parent, path, "" if end_marker else stripped, end_marker))
    return level


def _score_level(config: SearchConfig, level: list[_Candidate]) -> None:
    """Ranks among each parent's scored siblings, R(s) and the path sums.

    Ranks are stored under both presets (they do not depend on lambda), so a
    tree can be re-curated under the other preset. An end marker adds nothing
    to its path; an excluded candidate is never part of a response.
    """
    by_parent: dict[int, list[_Candidate]] = {}
    for c in level:
        by_parent.setdefault(id(c.parent), []).append(c)
    for siblings in by_parent.values():
        ranked = [c for c in siblings if c.eligible]
        text_ranks = rewards.sibling_rank_scores([c.record.beam_score for c in ranked])
        image_ranks = rewards.sibling_rank_scores([c.clip_raw for c in ranked])
        for c, text_rank, image_rank in zip(ranked, text_ranks, image_ranks, strict=True):
            rec, path = c.record, c.path
            rec.text_rank, rec.image_rank = text_rank, image_rank
            rec.reward = rewards.sentence_reward(config.preset, config.lam, rec.r_t, rec.r_i, text_rank, image_rank)
            path.sentences += 1
            path.r_t_sum += rec.r_t
            path.r_i_sum += rec.r_i
            path.text_rank_sum += text_rank
            path.image_rank_sum += image_rank
        for c in siblings:
            if not c.eligible and not c.end_marker and config.preset == rewards.Preset.paper:
                # shown for audit; an excluded candidate never enters a response
                c.record.reward = rewards.calibrated(config.lam, c.record.r_i, c.record.r_t)
            c.record.cumulative_reward = c.path.score(config)


def _select(config: SearchConfig, level: list[_Candidate], result: SearchResult) -> list[_Path]:
    for c in level:
        if c.record.is_final and c.record.exclusion_reason is None:
            c.record.is_kept = True
            result.responses.append(_response(c))
    # after-search: a degenerate candidate holds its place, as in the released
    # tree, which is pruned only once searched; it adds nothing to its path's score.
    holds_place = config.prune_degenerate == "after-search"
    pool = [c for c in level if not c.record.is_final and not c.end_marker
            and (c.record.exclusion_reason is None or (holds_place and c.record.exclusion_reason != DUPLICATE))]
    if config.select_by == "reward":
        pool.sort(key=lambda c: -c.record.cumulative_reward)
    elif config.select_by == "sentence-reward":
        pool.sort(key=lambda c: -c.record.reward)
    else:
        pool.sort(key=lambda c: -c.path.beam_path)
    k = config.num_beams
    if config.keep_rule == rewards.Preset.paper:
        # num_beams is "the capacity of input at each search layer" (appendix A.1)
        top, bottom = (k + 1) // 2, k // 2
        kept = pool if len(pool) <= k else pool[:top] + (pool[-bottom:] if bottom else [])
    elif len(pool) >= k:
        top, bottom = max(k // 2 - 1, 0), k // 2
        kept = pool[:top] + (pool[-bottom:] if bottom else [])
    else:
        kept = pool
    for c in kept:
        c.record.is_kept = True
    kept.sort(key=lambda c: c.record.node)
    return [c.path for c in kept]


def _response(c: _Candidate) -> ResponseRecord:
    path = c.path
    return ResponseRecord(
        leaf_node=c.record.node,
        # The decode of the whole response, not its candidates' texts joined:
        # those differ where an increment is not exact.
        text=stored_text.portable(path.settled),
        token_ids=list(path.tokens),
        sentence_count=path.sentences,
        logprob_sum=path.logprob_sum,
        r_t_sum=path.r_t_sum,
        r_i_sum=path.r_i_sum,
        text_rank_sum=path.text_rank_sum,
        image_rank_sum=path.image_rank_sum,
        is_truncated=c.record.finish_reason == MAX_LENGTH,
    )


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
