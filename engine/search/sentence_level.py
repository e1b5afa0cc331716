"""One depth of CSR's sentence tree: the candidates the token-level search
returned for each partial response, their rewards and ranks, and the active
set kept for the next depth (engine/search/sentence_search.py steps the tree
depth by depth with these).

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

from dataclasses import dataclass

from csr.engine import rewards
from csr.engine import text as stored_text
from csr.engine.search import degenerate
from csr.engine.search.beam_search import EOS, MAX_LENGTH, MAX_NEW_TOKENS
from csr.engine.search.config import SearchConfig
from csr.engine.search.records import CandidateRecord, ResponseRecord, SearchResult

EMPTY_RESPONSE = "empty_response"
DUPLICATE = "duplicate"
DEGENERATE_ANCESTOR = "degenerate_ancestor"


@dataclass
class PartialResponse:
    """A response grown sentence by sentence (partial until a candidate ends
    it): its tokens, its decode so far and the sums a response row needs."""

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


@dataclass
class Candidate:
    record: CandidateRecord
    parent: PartialResponse
    path: PartialResponse
    clip_text: str
    end_marker: bool
    clip_raw: float = 0.0

    @property
    def eligible(self) -> bool:
        return self.record.exclusion_reason is None and not self.end_marker


def make_candidates(policy, config, active, expansions, depth, result, at_length) -> list[Candidate]:
    level: list[Candidate] = []
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
            path = PartialResponse(
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
            level.append(Candidate(record, parent, path, "" if end_marker else stripped, end_marker))
    return level


def score_level(config: SearchConfig, level: list[Candidate]) -> None:
    """Ranks among each parent's scored siblings, R(s) and the path sums.

    Ranks are stored under both presets (they do not depend on lambda), so a
    tree can be re-curated under the other preset. An end marker adds nothing
    to its path; an excluded candidate is never part of a response.
    """
    by_parent: dict[int, list[Candidate]] = {}
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


def select_active(config: SearchConfig, level: list[Candidate], result: SearchResult) -> list[PartialResponse]:
    for c in level:
        if c.record.is_final and c.record.exclusion_reason is None:
            c.record.is_kept = True
            result.responses.append(response_record(c))
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


def response_record(c: Candidate) -> ResponseRecord:
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
