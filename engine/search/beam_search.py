"""The token-level diverse (group) beam search, on logits only.

Several independent searches ("parents") run side by side; a `step` callback
runs the model. Semantics follow transformers' beam search (v5
`_beam_search`, which equals v4 `BeamSearchScorer` for one group) per group,
and v4 `_group_beam_search` + `HammingDiversityLogitsProcessor` across groups;
where it departs from v4 is said in engine/search/sentence_search.py's docstring.
transformers 5 no longer ships group beam search in `generate()`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

SENTENCE_END = "sentence_end"
EOS = "eos"
MAX_NEW_TOKENS = "max_new_tokens"
MAX_LENGTH = "max_length"

# transformers marks impossible beams with -1e9 rather than -inf so that sums stay finite.
_NEG = -1.0e9


# --------------------------------------------------------------------------- token level


@dataclass(frozen=True)
class BeamSettings:
    num_beams: int
    num_beam_groups: int
    diversity_penalty: float
    eos_token_id: int | None  # None: EOS stops nothing (`eos_rule="contained"`)
    sentence_end_ids: tuple[int, ...]
    # Ids never selected (the policy's `masked_ids`): -inf before selection, as
    # transformers' `suppress_tokens`; the stored log-probs stay the model's.
    masked_ids: tuple[int, ...] = ()

    @property
    def stop_ids(self) -> tuple[int, ...]:
        eos = [] if self.eos_token_id is None else [self.eos_token_id]
        return tuple(dict.fromkeys([*eos, *self.sentence_end_ids]))


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
    masked = torch.tensor([i for i in settings.masked_ids if 0 <= i < vocab], dtype=torch.long, device=device)
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

    logits = first_logits
    for t in range(t_max):
        log_probs = torch.log_softmax(logits.float(), dim=-1)
        # Masked ids filled once for all rows (not once per group); the stored
        # log-probs are read from `log_probs`, the model's.
        selectable = log_probs.index_fill(-1, masked, float("-inf")) if masked.numel() else log_probs
        counts = torch.zeros(n_parents, vocab, dtype=torch.float32, device=device)
        new_src = torch.zeros(shape, dtype=torch.long, device=device)
        new_tok = torch.zeros(shape, dtype=torch.long, device=device)
        length = t + 1
        at_cap = length >= caps_t  # (P, 1)
        for g in range(groups):
            live = alive[:, g]
            if not bool(live.any()):
                continue
            rows_g = row_of[:, g]  # (P, size): model rows of this group's beams
            scores = selectable[rows_g]  # (P, size, V)
            if g > 0 and settings.diversity_penalty:
                scores = scores - settings.diversity_penalty * counts[:, None, :]
            acc = (scores + run_scores[:, g, :, None]).reshape(n_parents, size * vocab)
            top_v, top_i = acc.topk(k_top, dim=1)
            src = top_i // vocab
            tok = top_i % vocab
            stopped = torch.isin(tok, stop)
            hits = stopped | at_cap

            # Running beams: the best `size` candidates without a stop token. At
            # the length cap they are never expanded, but, as in v4's group beam
            # search, later groups still pay the diversity penalty for them.
            run_v = top_v + stopped.float() * _NEG
            pick = run_v.topk(size, dim=1).indices
            n_src = src.gather(1, pick)
            n_tok = tok.gather(1, pick)
            n_lp = log_probs[rows_g.gather(1, n_src), n_tok]
            prev_tokens = run_tokens[:, g].gather(1, n_src[..., None].expand(-1, -1, t_max))
            prev_lps = run_lps[:, g].gather(1, n_src[..., None].expand(-1, -1, t_max))

            # Finished: stopping candidates among the top `size` ranks,
            # length-normalised. Most steps have none: the merge is skipped then
            # (it could only reorder invalid entries, which nothing reads).
            cand_ok = hits[:, :size] & improvable[:, g : g + 1] & live[:, None]
            if bool(cand_ok.any()):
                top_src, top_tok = src[:, :size], tok[:, :size]
                cand_scores = torch.where(cand_ok, top_v[:, :size] / length, torch.full_like(top_v[:, :size], _NEG))
                cand_tokens = run_tokens[:, g].gather(1, top_src[..., None].expand(-1, -1, t_max)).clone()
                cand_tokens[:, :, t] = top_tok
                cand_lps = run_lps[:, g].gather(1, top_src[..., None].expand(-1, -1, t_max)).clone()
                cand_lps[:, :, t] = log_probs[rows_g.gather(1, top_src), top_tok]
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
