"""CSR's sentence-level beam search (section 3.2.1, algorithm 1, appendix A.1),
on top of a token-level diverse (group) beam search that we implement
ourselves, batched and with the KV cache.

Layers, bottom up:

- `group_beam_search`: the token-level algorithm on logits only. Several
  independent searches ("parents") run side by side; a `step` callback runs
  the model. Semantics follow transformers' beam search (v5 `_beam_search`,
  which equals v4 `BeamSearchScorer` for one group) per group, and v4
  `_group_beam_search` + `HammingDiversityLogitsProcessor` across groups.
- `PromptPrefix` / `expand_partials`: the model side. The prompt (image
  features + prompt tokens) is run once per prompt and its KV cache copied
  for every expansion; the partial responses' own tokens run in one padded
  forward pass; then all partials x beams advance in one forward pass per
  token. The cache lives in preallocated buffers (`_BufferLayer`) and rows
  stay in place as beams finish or fork, only moved rows are copied
  (`_CachedRows`): with a long image prefix, transformers' concatenating
  cache and per-step reordering copied the whole cache every token and took
  three quarters of the time.
- `run_sentence_search`: the tree of sentences, rewards and selection, with
  the model and CLIP behind two callables so that the benchmark can plug the
  naive (released-code style) versions into the very same tree logic.
- `sentence_beam_search`: what `csr generate` calls per prompt.

Where the token-level search departs from transformers 4.x group beam
search (none of these changes the one-group result, which the tests compare
with transformers 5 `generate`):

- Early stopping (`early_stopping=False`) tests the best *running* beam
  against the worst finished one, as v5 does; v4 used the best candidate of
  the step, stop tokens included.
- A group that is done takes no more rows in the batch and adds nothing to
  the diversity penalty of later groups; v4 kept feeding it pad tokens, so
  later groups were penalised for the pad token only.

Decisions where the paper is silent (recorded here and in spec/CSR.md terms):

- A sentence ends at a full-stop token (`Policy.sentence_end_ids`), at EOS, or
  after `max_new_tokens`; a sentence cut by `max_new_tokens` is not final and
  is expanded further, as in the released code.
- `max_length` bounds the *response* in tokens (prompt and image tokens not
  counted, so the setting does not depend on the model's image-token count).
  Each expansion gets min(max_new_tokens, max_length - response length) new
  tokens; a candidate whose response reaches max_length is final.
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
- Selection key: `select_by="reward"` (paper) ranks by the path's response
  score under the preset; `select_by="text"` (released code) by the path's sum
  of penalised beam scores (its `node.score`).
- The preset picks `max_new_tokens`, `select_by`, `keep_rule` and
  `degenerate_rules` unless they are set (PRESET_SEARCH_DEFAULTS).
- Degenerate candidates (`csr.engine.degenerate`) are stored with their
  reason, never expanded, never final. Under csr's rules, a candidate whose
  stripped text equals an earlier non-excluded sibling's is stored with
  exclusion_reason "duplicate" and not expanded (group beam search can return
  the same sentence from two groups); the released rules keep it.
- Sibling ranks (text rank on the penalised beam score, image rank on 100 cos)
  are taken among the non-excluded, non-end-marker siblings, and stored under
  both presets. R_T uses the raw model log-probs of the sentence tokens (EOS
  included when it ended the sentence).
- Text of a candidate: the exact increment of the decoded response
  (`csr.engine.text`), so that concatenating a path's texts gives the decoded
  response; CLIP and the degenerate filters see it stripped.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
from transformers.cache_utils import DynamicCache

from csr.engine import degenerate, rewards
from csr.engine import text as stored_text
from csr.engine.cascade_attention import PrefixKV, supports_cascade
from csr.engine.kv_cache import (  # noqa: F401  (re-exported: tests and the bench use them from here)
    CascadeRows,
    _assign_slots,
    _buffer_cache,
    _BufferLayer,
    _CachedRows,
    _is_plain_cache,
)

SENTENCE_END = "sentence_end"
EOS = "eos"
MAX_NEW_TOKENS = "max_new_tokens"
MAX_LENGTH = "max_length"

EMPTY_RESPONSE = "empty_response"
DUPLICATE = "duplicate"

SELECT_BY = ("reward", "text")
KEEP_RULES = ("paper", "reference-code")

# transformers marks impossible beams with -1e9 rather than -inf so that sums stay finite.
_NEG = -1.0e9


# What each preset implies for the search; any of these can still be set on its own.
PRESET_SEARCH_DEFAULTS: dict[str, dict[str, Any]] = {
    rewards.PAPER: {
        "max_new_tokens": 74,  # appendix A.1
        "select_by": "reward",  # the calibrated reward guides the selection (section 3.2.1)
        "keep_rule": "paper",  # num_beams in all: top ceil(k/2) + bottom floor(k/2)
        "degenerate_rules": "csr",
    },
    rewards.REFERENCE_CODE: {
        "max_new_tokens": 70,  # step1.sh
        "select_by": "text",  # node.score: the path's sum of penalised beam scores
        "keep_rule": "reference-code",  # new_nodes[:int(k/2)-1] + new_nodes[-int(k/2):]
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
    preset: str = rewards.PAPER
    lam: float = 0.9
    select_by: str | None = None
    keep_rule: str | None = None
    degenerate_rules: str | None = None

    def __post_init__(self) -> None:
        if self.preset not in rewards.PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; choose one of {', '.join(rewards.PRESETS)}")
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


# --------------------------------------------------------------------------- token level


@dataclass(frozen=True)
class BeamSettings:
    num_beams: int
    num_beam_groups: int
    diversity_penalty: float
    eos_token_id: int
    sentence_end_ids: tuple[int, ...]

    @property
    def stop_ids(self) -> tuple[int, ...]:
        return tuple(dict.fromkeys([self.eos_token_id, *self.sentence_end_ids]))


@dataclass
class TokenBeam:
    """One sequence returned by the token-level search."""

    token_ids: list[int]
    token_logprobs: list[float]  # raw model log-softmax of each chosen token (no penalty)
    finish_reason: str  # SENTENCE_END | EOS | MAX_NEW_TOKENS
    score: float  # the beam score it was ranked by: penalised log-prob sum / length

    @property
    def logprob_sum(self) -> float:
        return float(sum(self.token_logprobs))


StepFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def group_beam_search(
    first_logits: torch.Tensor,
    step: StepFn,
    caps: Sequence[int],
    settings: BeamSettings,
) -> list[list[TokenBeam]]:
    """Diverse beam search for P independent parents, one model call per token.

    `first_logits` (P, V): next-token logits of each parent; row p of the
    model state is parent p. `step(rows, tokens)` must reorder/select the
    model state to `rows` (indices into its current rows, repeats allowed),
    feed `tokens` (one per row) and return the next-token logits (R, V).
    `caps[p]` is the most new tokens parent p may take.

    Returns per parent all num_beams finished sequences, best score first.
    """
    n_parents, vocab = first_logits.shape
    groups = settings.num_beam_groups
    size = settings.num_beams // groups  # beams per group
    device = first_logits.device
    stop = torch.tensor(settings.stop_ids, device=device)
    # As transformers: keep enough candidates that `size` non-finished ones remain.
    k_top = min(max(2, 1 + len(settings.stop_ids)) * size, size * vocab)
    caps_t = torch.tensor(list(caps), device=device).view(n_parents, 1)
    t_max = max(caps)

    shape = (n_parents, groups, size)
    run_tokens = torch.zeros(*shape, t_max, dtype=torch.long, device=device)
    run_lps = torch.zeros(*shape, t_max, dtype=torch.float32, device=device)
    # First beam of each group starts at 0, the others at -1e9, so that step 0
    # does not pick the same token for every beam of a group.
    run_scores = torch.full(shape, _NEG, dtype=torch.float32, device=device)
    run_scores[:, :, 0] = 0.0
    fin_tokens = torch.zeros_like(run_tokens)
    fin_lps = torch.zeros_like(run_lps)
    fin_len = torch.zeros(shape, dtype=torch.long, device=device)
    fin_scores = torch.full(shape, _NEG, dtype=torch.float32, device=device)
    fin_valid = torch.zeros(shape, dtype=torch.bool, device=device)
    # Per (parent, group): can the running beams still beat the worst finished one?
    improvable = torch.ones(n_parents, groups, dtype=torch.bool, device=device)
    alive = torch.ones(n_parents, groups, dtype=torch.bool, device=device)
    # Where each running beam lives in the model state; at first all are copies of the parent row.
    row_of = torch.arange(n_parents, device=device).view(-1, 1, 1).expand(shape).clone()
    parent_idx = torch.arange(n_parents, device=device)

    logits = first_logits
    for t in range(t_max):
        log_probs = torch.log_softmax(logits.float(), dim=-1)
        lp_all = log_probs[row_of]  # (P, G, size, V)
        counts = torch.zeros(n_parents, vocab, dtype=torch.float32, device=device)
        new_src = torch.zeros(shape, dtype=torch.long, device=device)
        new_tok = torch.zeros(shape, dtype=torch.long, device=device)
        length = t + 1
        for g in range(groups):
            live = alive[:, g]
            if not bool(live.any()):
                continue
            lp = lp_all[:, g]  # (P, size, V)
            scores = lp
            if g > 0 and settings.diversity_penalty:
                scores = lp - settings.diversity_penalty * counts[:, None, :]
            acc = (scores + run_scores[:, g, :, None]).reshape(n_parents, size * vocab)
            top_v, top_i = acc.topk(k_top, dim=1)
            src = top_i // vocab
            tok = top_i % vocab
            stopped = torch.isin(tok, stop)
            hits = stopped | (length >= caps_t)

            # Running beams: the best `size` candidates without a stop token. At
            # the length cap they are never expanded, but, as in v4's group beam
            # search, later groups still pay the diversity penalty for them.
            run_v = top_v + stopped.float() * _NEG
            pick = run_v.topk(size, dim=1).indices
            n_src = src.gather(1, pick)
            n_tok = tok.gather(1, pick)
            n_lp = lp[parent_idx[:, None], n_src, n_tok]
            prev_tokens = run_tokens[:, g].gather(1, n_src[..., None].expand(-1, -1, t_max))
            prev_lps = run_lps[:, g].gather(1, n_src[..., None].expand(-1, -1, t_max))

            # Finished: stopping candidates among the top `size` ranks, length-normalised.
            top_src, top_tok = src[:, :size], tok[:, :size]
            cand_ok = hits[:, :size] & improvable[:, g : g + 1] & live[:, None]
            cand_scores = torch.where(cand_ok, top_v[:, :size] / length, torch.full_like(top_v[:, :size], _NEG))
            cand_tokens = run_tokens[:, g].gather(1, top_src[..., None].expand(-1, -1, t_max)).clone()
            cand_tokens[:, :, t] = top_tok
            cand_lps = run_lps[:, g].gather(1, top_src[..., None].expand(-1, -1, t_max)).clone()
            cand_lps[:, :, t] = lp[parent_idx[:, None], top_src, top_tok]
            merged_scores = torch.cat([fin_scores[:, g], cand_scores], dim=1)
            keep = merged_scores.topk(size, dim=1).indices
            fin_scores[:, g] = merged_scores.gather(1, keep)
            fin_valid[:, g] = torch.cat([fin_valid[:, g], cand_ok], dim=1).gather(1, keep)
            length_col = torch.full_like(cand_scores, length, dtype=torch.long)
            fin_len[:, g] = torch.cat([fin_len[:, g], length_col], dim=1).gather(1, keep)
            idx = keep[..., None].expand(-1, -1, t_max)
            fin_tokens[:, g] = torch.cat([fin_tokens[:, g], cand_tokens], dim=1).gather(1, idx)
            fin_lps[:, g] = torch.cat([fin_lps[:, g], cand_lps], dim=1).gather(1, idx)

            # Commit the running beams of live parents only.
            prev_tokens[:, :, t] = n_tok
            prev_lps[:, :, t] = n_lp
            lv = live[:, None]
            run_tokens[:, g] = torch.where(lv[..., None], prev_tokens, run_tokens[:, g])
            run_lps[:, g] = torch.where(lv[..., None], prev_lps, run_lps[:, g])
            new_scores = run_v.gather(1, pick)
            run_scores[:, g] = torch.where(lv, new_scores, run_scores[:, g])
            new_src[:, g] = n_src
            new_tok[:, g] = n_tok
            # Hamming diversity: later groups pay for the tokens this group's running beams chose.
            if settings.diversity_penalty:
                counts.scatter_add_(1, n_tok, lv.float().expand(-1, size).contiguous())

            # Early stopping (early_stopping=False): done when the best running
            # beam, normalised by the current length, cannot beat the worst of a
            # full set of finished ones; or when every candidate stopped.
            best_running = new_scores[:, 0] / length
            worst_finished = fin_scores[:, g].min(dim=1).values
            full = fin_valid[:, g].all(dim=1)
            improvable[:, g] &= ~full | (best_running > worst_finished)
            all_stopped = hits.all(dim=1)
            alive[:, g] &= improvable[:, g] & ~all_stopped

        if not bool(alive.any()):
            break
        # Model state for the next step: the running beams of live (parent, group)s, in order.
        live_pg = alive.nonzero(as_tuple=False)  # row-major: parent, then group
        p_live, g_live = live_pg[:, 0], live_pg[:, 1]
        rows = row_of[p_live[:, None], g_live[:, None], new_src[p_live, g_live]].reshape(-1)
        tokens = new_tok[p_live, g_live].reshape(-1)
        row_of = torch.zeros_like(row_of)
        row_of[p_live, g_live] = torch.arange(rows.numel(), device=device).view(-1, size)
        logits = step(rows, tokens)

    return _collect(fin_tokens, fin_lps, fin_len, fin_scores, fin_valid, settings)


def _collect(fin_tokens, fin_lps, fin_len, fin_scores, fin_valid, settings) -> list[list[TokenBeam]]:
    n_parents = fin_tokens.shape[0]
    tokens = fin_tokens.reshape(n_parents, -1, fin_tokens.shape[-1]).tolist()
    lps = fin_lps.reshape(n_parents, -1, fin_lps.shape[-1]).tolist()
    lengths = fin_len.reshape(n_parents, -1).tolist()
    scores = fin_scores.reshape(n_parents, -1).tolist()
    valid = fin_valid.reshape(n_parents, -1).tolist()
    ends = set(settings.sentence_end_ids)
    out: list[list[TokenBeam]] = []
    for p in range(n_parents):
        beams = []
        # Best first across all groups, as transformers' finalize does.
        for j in sorted(range(len(scores[p])), key=lambda j: -scores[p][j]):
            if not valid[p][j]:
                continue
            n = lengths[p][j]
            ids = tokens[p][j][:n]
            last = ids[-1]
            if last == settings.eos_token_id:
                reason = EOS
            elif last in ends:
                reason = SENTENCE_END
            else:
                reason = MAX_NEW_TOKENS
            beams.append(TokenBeam(ids, lps[p][j][:n], reason, scores[p][j]))
        out.append(beams)
    return out


# --------------------------------------------------------------------------- model side


class PromptPrefix:
    """One prompt run once through the model: its KV cache and last logits.

    Every expansion copies this cache (the prompt cache is never mutated), so
    image features and prompt tokens are computed once per prompt.
    """

    def __init__(self, policy, image, user_prompt: str):
        self.policy = policy
        inputs = policy.encode(image, user_prompt)
        self.length = int(inputs["input_ids"].shape[1])
        with torch.inference_mode():
            out = policy.model(**inputs, use_cache=True, logits_to_keep=1)
        self.cache = out.past_key_values
        self.last_logits = out.logits[0, -1].float()
        self.forward_passes = 1
        self._kv: PrefixKV | None = None

    def copy_cache(self, rows: int, capacity: int):
        """The prompt cache repeated for `rows` rows, with room for `capacity` tokens."""
        data = [(k.expand(rows, -1, -1, -1), v.expand(rows, -1, -1, -1)) for k, v, *_ in self.cache]
        if _is_plain_cache(self.cache):
            return _buffer_cache(data, capacity)
        return DynamicCache(ddp_cache_data=data, config=self.policy.model.config)

    @property
    def shares_prefix(self) -> bool:
        """Whether the shared-prefix attention applies: full-attention layers
        only, in a decoder whose attention goes through transformers' interface."""
        return _is_plain_cache(self.cache) and supports_cascade(self.policy.model)

    @property
    def kv(self) -> PrefixKV:
        """The prefix KV once, for the shared-prefix path (views of the prompt cache, no copy)."""
        if self._kv is None:
            self._kv = PrefixKV.from_cache(self.cache)
        return self._kv


def _extend(
    prefix: PromptPrefix, partials: Sequence[Sequence[int]], max_new: int
) -> tuple[_CachedRows, torch.Tensor]:
    """Copy the prompt cache for each partial response and run their response
    tokens in one padded forward pass. Padding sits between the prompt and the
    response, masked out, with explicit position ids, so each row computes
    exactly what it would alone."""
    model = prefix.policy.model
    device = prefix.last_logits.device
    n = len(partials)
    lengths = [len(p) for p in partials]
    width = max(lengths)
    cache = prefix.copy_cache(n, prefix.length + width + max_new)
    mask = torch.ones(n, prefix.length, dtype=torch.long, device=device)
    next_pos = torch.tensor([prefix.length + m for m in lengths], device=device)
    pad = prefix.policy.tokenizer.pad_token_id or 0
    rows = _CachedRows(model, cache, mask, next_pos)
    first = prefix.last_logits.expand(n, -1).clone()
    if width == 0:
        return rows, first
    ids = torch.full((n, width), pad, dtype=torch.long, device=device)
    ext_mask = torch.zeros(n, width, dtype=torch.long, device=device)
    pos = torch.full((n, width), prefix.length, dtype=torch.long, device=device)
    for i, part in enumerate(partials):
        m = len(part)
        if m:
            ids[i, width - m :] = torch.tensor(list(part), device=device)
            ext_mask[i, width - m :] = 1
            pos[i, width - m :] = torch.arange(prefix.length, prefix.length + m, device=device)
    rows.mask = torch.cat([mask, ext_mask], dim=1)
    with torch.inference_mode():
        out = model(
            input_ids=ids,
            attention_mask=rows.mask,
            position_ids=pos,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
    rows.forward_passes += 1
    rows.rows_forwarded += n * width
    has_tokens = torch.tensor(lengths, device=device)[:, None] > 0
    first = torch.where(has_tokens, out.logits[:, -1].float(), first)
    return rows, first


@dataclass
class ExpandStats:
    forward_passes: int = 0
    rows_forwarded: int = 0
    # Shared-prefix path only (for the bench's FLOP count): real query tokens
    # run, and keys attended summed over them, per layer.
    tokens: int = 0
    attended: int = 0
    logit_rows: int = 0
    # The most KV-cache bytes one batch held (prefixes and rows).
    peak_kv_bytes: int = 0


ATTENTION = ("cascade", "plain")


def _extend_shared(
    prefixes: Sequence[PromptPrefix], parents: Sequence[tuple[int, Sequence[int]]], max_new: int
) -> tuple[CascadeRows, torch.Tensor]:
    """`_extend` with the shared-prefix attention, over the prompts `prefixes`:
    parent i is (prompt index, partial response). Only the partial responses'
    own tokens are run and stored per row; the prefixes are shared."""
    model = prefixes[0].policy.model
    device = prefixes[0].last_logits.device
    n = len(parents)
    lengths = [len(part) for _, part in parents]
    width = max(lengths)
    starts = [prefixes[p].length for p, _ in parents]
    row_prompt = torch.tensor([p for p, _ in parents], device=device)
    next_pos = torch.tensor([start + m for start, m in zip(starts, lengths, strict=True)], device=device)
    rows = CascadeRows(model, [pf.kv for pf in prefixes], row_prompt, next_pos, width + max_new)
    first = torch.stack([prefixes[p].last_logits for p, _ in parents])
    if width == 0:
        return rows, first
    pad = prefixes[0].policy.tokenizer.pad_token_id or 0
    ids = torch.full((n, width), pad, dtype=torch.long, device=device)
    valid = torch.zeros(n, width, dtype=torch.bool, device=device)
    pos = torch.tensor(starts, device=device)[:, None].repeat(1, width)
    for i, (_, part) in enumerate(parents):
        m = len(part)
        if m:
            ids[i, width - m :] = torch.tensor(list(part), device=device)
            valid[i, width - m :] = True
            pos[i, width - m :] = torch.arange(starts[i], starts[i] + m, device=device)
    logits = rows.forward(ids, valid, pos)
    has_tokens = torch.tensor(lengths, device=device)[:, None] > 0
    return rows, torch.where(has_tokens, logits.float(), first)


def expand_prompts(
    jobs: Sequence[tuple[PromptPrefix, Sequence[Sequence[int]], Sequence[int]]],
    settings: BeamSettings,
    max_rows: int | None = None,
    stats: ExpandStats | None = None,
    attention: str = "cascade",
) -> list[list[list[TokenBeam]]]:
    """`expand_partials` for several prompts at once: jobs are (prefix,
    partials, caps); with the shared-prefix attention the parents of all
    prompts advance in the same forward passes. `max_rows` bounds the rows
    of one batch (parents are split into chunks; results do not change).
    Returns the candidates per job, per partial."""
    if attention not in ATTENTION:
        raise ValueError(f"attention must be one of {', '.join(ATTENTION)}, got {attention!r}")
    shared = attention == "cascade" and all(prefix.shares_prefix for prefix, _, _ in jobs)
    parents = [(j, part, cap) for j, (_, partials, caps) in enumerate(jobs)
               for part, cap in zip(partials, caps, strict=True)]
    per_chunk = len(parents) if max_rows is None else max(1, max_rows // settings.num_beams)
    found: list[list[TokenBeam]] = []
    for start in range(0, len(parents), per_chunk):
        chunk = parents[start : start + per_chunk]
        chunk_caps = [cap for _, _, cap in chunk]
        if shared:
            prompts = sorted({j for j, _, _ in chunk})
            local = {j: i for i, j in enumerate(prompts)}
            rows, first = _extend_shared(
                [jobs[j][0] for j in prompts], [(local[j], part) for j, part, _ in chunk], max(chunk_caps)
            )
        else:
            prefixes = {j for j, _, _ in chunk}
            if len(prefixes) > 1:  # the per-row path holds one prompt per batch
                raise ValueError("the plain attention path expands one prompt per batch")
            rows, first = _extend(jobs[chunk[0][0]][0], [part for _, part, _ in chunk], max(chunk_caps))
        found.extend(group_beam_search(first, rows.step, chunk_caps, settings))
        if stats is not None:
            stats.forward_passes += rows.forward_passes
            stats.rows_forwarded += rows.rows_forwarded
            stats.peak_kv_bytes = max(stats.peak_kv_bytes, rows.peak_kv_bytes)
            if shared:
                stats.tokens += int(rows.tokens)
                stats.attended += int(rows.attended)
                stats.logit_rows += rows.logit_rows
    out: list[list[list[TokenBeam]]] = [[] for _ in jobs]
    for (j, _, _), beams in zip(parents, found, strict=True):
        out[j].append(beams)
    return out


def expand_partials(
    prefix: PromptPrefix,
    partials: Sequence[Sequence[int]],
    caps: Sequence[int],
    settings: BeamSettings,
    max_rows: int | None = None,
    stats: ExpandStats | None = None,
    attention: str = "cascade",
) -> list[list[TokenBeam]]:
    """Next-sentence candidates for each partial response (token ids after the
    prompt), all partials x beams in one forward pass per token. `attention`:
    "cascade" holds the prefix once and shares it between rows, "plain"
    copies it into every row (same results; the reference in the tests).
    `max_rows` bounds the batch (parents are split into chunks; results do not change)."""
    return expand_prompts([(prefix, partials, caps)], settings, max_rows, stats, attention)[0]


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
    settled: str  # raw decode of `tokens` that later tokens cannot change
    text: str  # the stored (portable) texts of the path, concatenated
    sentences: int = 0
    logprob_sum: float = 0.0
    r_t_sum: float = 0.0
    r_i_sum: float = 0.0
    text_rank_sum: float = 0.0
    image_rank_sum: float = 0.0
    beam_path: float = 0.0  # the released code's node.score: sum of penalised beam scores

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


def run_sentence_search(policy, config: SearchConfig, expand: ExpandFn, score: ScoreFn) -> SearchResult:
    """The sentence-level beam search tree, with the model behind `expand`
    (partials, caps -> candidates per partial) and CLIP behind `score`
    (texts -> 100 cos). See the module docstring for the decisions it makes."""
    started = time.perf_counter()
    result = SearchResult(records=[])
    stats = result.stats
    active = [_Path(None, [], "", "")]
    depth = 0
    while active:
        stats.max_active = max(stats.max_active, len(active))
        caps = [min(config.max_new_tokens, config.max_length - len(p.tokens)) for p in active]
        t0 = time.perf_counter()
        expansions = expand([p.tokens for p in active], caps)
        t1 = time.perf_counter()
        stats.model_seconds += t1 - t0
        level = _make_candidates(policy, config, active, expansions, depth, result)
        clip_texts = [c.clip_text for c in level if c.clip_text]
        t2 = time.perf_counter()
        raw_scores = iter(score(clip_texts) if clip_texts else [])
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


def _make_candidates(policy, config, active, expansions, depth, result) -> list[_Candidate]:
    level: list[_Candidate] = []
    for parent, beams in zip(active, expansions, strict=True):
        seen: set[str] = set()
        for sibling, beam in enumerate(beams):
            tokens = parent.tokens + beam.token_ids
            reason = beam.finish_reason
            at_limit = len(tokens) >= config.max_length
            if at_limit and reason == MAX_NEW_TOKENS:
                reason = MAX_LENGTH
            is_final = reason == EOS or at_limit
            decoded = policy.decode(tokens)
            text = stored_text.portable(stored_text.increment(parent.settled, decoded, is_final))
            stripped = text.strip()
            end_marker = reason == EOS and stored_text.is_blank(text)
            if end_marker:
                exclusion = EMPTY_RESPONSE if depth == 0 else None
            else:
                exclusion = degenerate.reason_for(config.degenerate_rules, text)
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
            )
            result.records.append(record)
            path = _Path(
                node=record.node,
                tokens=tokens,
                settled=decoded if is_final else stored_text.settled(decoded),
                text=parent.text + text,
                sentences=parent.sentences,
                logprob_sum=parent.logprob_sum + logprob_sum,
                r_t_sum=parent.r_t_sum,
                r_i_sum=parent.r_i_sum,
                text_rank_sum=parent.text_rank_sum,
                image_rank_sum=parent.image_rank_sum,
                beam_path=parent.beam_path + float(beam.score),
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
            if not c.eligible and not c.end_marker and config.preset == rewards.PAPER:
                # shown for audit; an excluded candidate never enters a response
                c.record.reward = rewards.calibrated(config.lam, c.record.r_i, c.record.r_t)
            c.record.cumulative_reward = c.path.score(config)


def _select(config: SearchConfig, level: list[_Candidate], result: SearchResult) -> list[_Path]:
    for c in level:
        if c.record.is_final and c.record.exclusion_reason is None:
            c.record.is_kept = True
            result.responses.append(_response(c))
    pool = [c for c in level if not c.record.is_final and c.eligible]
    if config.select_by == "reward":
        pool.sort(key=lambda c: -c.record.cumulative_reward)
    else:
        pool.sort(key=lambda c: -c.path.beam_path)
    k = config.num_beams
    if config.keep_rule == "paper":
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
        text=path.text,
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
    settings = BeamSettings(
        eos_token_id=policy.eos_token_id,
        sentence_end_ids=tuple(policy.sentence_end_ids),
        **config.beam_settings_kwargs,
    )
    t0 = time.perf_counter()
    prefix = PromptPrefix(policy, image, prompt_text)
    if image_embedding is None:
        image_embedding = clip.encode_image(image)
    prefix_seconds = time.perf_counter() - t0
    expand_stats = ExpandStats()

    def expand(partials: list[list[int]], caps: list[int]) -> list[list[TokenBeam]]:
        return expand_partials(prefix, partials, caps, settings, max_rows, expand_stats)

    def score(texts: list[str]) -> list[float]:
        return clip.raw_scores(image_embedding, texts)

    result = run_sentence_search(policy, config, expand, score)
    result.stats.forward_passes = expand_stats.forward_passes + prefix.forward_passes
    result.stats.rows_forwarded = expand_stats.rows_forwarded + prefix.length
    result.stats.model_seconds += prefix_seconds
    result.stats.total_seconds += prefix_seconds
    return result


def naive_expand(
    policy,
    image,
    user_prompt: str,
    partials: Sequence[Sequence[int]],
    caps: Sequence[int],
    settings: BeamSettings,
    stats: ExpandStats | None = None,
) -> list[list[TokenBeam]]:
    """`expand_partials` the way the authors' released code pays for it: one
    `generate` call per partial response, each re-running the vision tower and
    the whole prefix (prompt + response so far), on `num_beams` copies of the
    input as transformers' beam search expands it before the first forward.
    The token-level search itself is the same, so results are the same."""
    model = policy.model
    out: list[list[TokenBeam]] = []
    for part, cap in zip(partials, caps, strict=True):
        inputs = policy.encode(image, user_prompt)
        ids = inputs["input_ids"]
        if part:
            ids = torch.cat([ids, torch.tensor([list(part)], device=ids.device)], dim=1)
        inputs["input_ids"] = ids
        inputs["attention_mask"] = torch.ones_like(ids)
        n = settings.num_beams
        batch = {k: v.repeat_interleave(n, dim=0) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
        with torch.inference_mode():
            first = model(**batch, use_cache=True, logits_to_keep=1)
        length = ids.shape[1]
        cache = first.past_key_values
        if _is_plain_cache(cache):  # the same cache implementation as the batched search
            cache = _buffer_cache([(k, v) for k, v, *_ in cache], length + cap)
        rows = _CachedRows(
            model,
            cache,
            batch["attention_mask"],
            torch.full((n,), length, dtype=torch.long, device=ids.device),
        )
        out.extend(group_beam_search(first.logits[:1, -1].float(), rows.step, [cap], settings))
        if stats is not None:
            stats.forward_passes += rows.forward_passes + 1
            stats.rows_forwarded += rows.rows_forwarded + n * length
    return out


def naive_sentence_beam_search(policy, clip, image, prompt_text: str, config: SearchConfig) -> SearchResult:
    """The same sentence-level search, computed as the released code does:
    each partial response expanded on its own with the prefix recomputed
    (`naive_expand`), the image re-encoded by CLIP for every sentence and
    each sentence scored alone. The baseline of bench/bench_search.py and
    the reference the batched search is tested against."""
    settings = BeamSettings(
        eos_token_id=policy.eos_token_id,
        sentence_end_ids=tuple(policy.sentence_end_ids),
        **config.beam_settings_kwargs,
    )
    expand_stats = ExpandStats()

    def expand(partials: list[list[int]], caps: list[int]) -> list[list[TokenBeam]]:
        return naive_expand(policy, image, prompt_text, partials, caps, settings, expand_stats)

    def score(texts: list[str]) -> list[float]:
        return [clip.raw_scores(clip.encode_image(image), [text])[0] for text in texts]

    result = run_sentence_search(policy, config, expand, score)
    result.stats.forward_passes = expand_stats.forward_passes
    result.stats.rows_forwarded = expand_stats.rows_forwarded
    return result


def response_text(records: Sequence[CandidateRecord], leaf: int) -> str:
    """The response ending at candidate `leaf`: its path's texts, concatenated."""
    parts = []
    node: int | None = leaf
    while node is not None:
        parts.append(records[node].text)
        node = records[node].parent_node
    return "".join(reversed(parts))
