"""The model side of the search: a prompt's prefix run once, and the next
sentences of many partial responses expanded in one forward pass per token.

`PromptPrefix` runs the image and the prompt once; `expand_partials` /
`expand_prompts` give each partial response its token-level diverse beam
search (engine/search/beam_search.py), with the prefix KV shared by every row
(engine/search/cascade_attention.py) or copied per row (`attention="plain"`).
tests/reference_search.py pays for the same results the way the authors'
released code does: the baseline of bench/bench_search.py and a reference in tests.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers.cache_utils import DynamicCache

from csr.engine.search.beam_search import BeamSettings, TokenBeam, group_beam_search
from csr.engine.search.cascade_attention import PrefixKV
from csr.engine.search.kv_cache import (
    CachedRows,
    CascadeRows,
    buffer_cache,
    is_plain_cache,
)

log = logging.getLogger(__name__)
# Families already told they search on the per-row path (said once per process).
_PER_ROW_SAID: set[str] = set()

# --------------------------------------------------------------------------- model side


class PromptPrefix:
    """One prompt run once through the model: its KV cache and last logits.

    Every expansion copies this cache (the prompt cache is never mutated), so
    image features and prompt tokens are computed once per prompt.
    """

    def __init__(self, policy, image, user_prompt: str, template: str = "chat"):
        self.policy = policy
        inputs = policy.encode(image, user_prompt, template)
        self.length = int(inputs["input_ids"].shape[1])
        with torch.inference_mode():
            out = policy.model(**inputs, use_cache=True, logits_to_keep=1)
            # Where the model's positions stand against sequence indices after
            # this prompt (M-RoPE's rope delta; 0 for 1-D positions).
            self.shift = policy.adapter.prefix_shift(policy.model, inputs)
        self.cache = out.past_key_values
        self.last_logits = out.logits[0, -1].float()
        self.forward_passes = 1
        self._kv: PrefixKV | None = None

    def copy_cache(self, rows: int, capacity: int):
        """The prompt cache repeated for `rows` rows, with room for `capacity` tokens."""
        data = [(k.expand(rows, -1, -1, -1), v.expand(rows, -1, -1, -1)) for k, v, *_ in self.cache]
        if is_plain_cache(self.cache):
            return buffer_cache(data, capacity)
        return DynamicCache(ddp_cache_data=data, config=self.policy.model.config)

    @property
    def shares_prefix(self) -> bool:
        """Whether the shared-prefix attention applies (the adapter says):
        full-attention layers only, in a decoder whose attention goes through
        transformers' interface."""
        return self.policy.adapter.shares_prefix(self.policy.model, self.cache)

    def position_ids(self, positions: torch.Tensor) -> torch.Tensor:
        """The model's position ids for this prompt's rows at sequence indices `positions` (rows, n)."""
        shift = torch.full((positions.shape[0],), self.shift, dtype=positions.dtype, device=positions.device)
        return self.policy.adapter.row_position_ids(positions, shift)

    @property
    def kv(self) -> PrefixKV:
        """The prefix KV once, for the shared-prefix path (views of the prompt cache, no copy)."""
        if self._kv is None:
            self._kv = PrefixKV.from_cache(self.cache)
        return self._kv


def _extend(
    prefix: PromptPrefix, partials: Sequence[Sequence[int]], max_new: int
) -> tuple[CachedRows, torch.Tensor]:
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
    rows = CachedRows(model, cache, mask, next_pos, prefix.position_ids)
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
            position_ids=prefix.position_ids(pos),
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
    rows.forward_passes += 1
    rows.rows_forwarded += n * width
    rows.count(ext_mask)
    has_tokens = torch.tensor(lengths, device=device)[:, None] > 0
    first = torch.where(has_tokens, out.logits[:, -1].float(), first)
    return rows, first


@dataclass
class ExpandStats:
    forward_passes: int = 0
    rows_forwarded: int = 0
    # For the bench's FLOP count: real query tokens run, and keys attended
    # summed over them, per layer (both paths count the same work).
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
    adapter = prefixes[0].policy.adapter
    shifts = torch.tensor([pf.shift for pf in prefixes], device=device)
    rows = CascadeRows(
        model, [pf.kv for pf in prefixes], row_prompt, next_pos, width + max_new,
        lambda positions, row_prompt: adapter.row_position_ids(positions, shifts[row_prompt]),
    )
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


def _say_per_row(adapter) -> None:
    if adapter.family not in _PER_ROW_SAID:
        _PER_ROW_SAID.add(adapter.family)
        why = adapter.per_row_reason or "its cache or attention is not the plain full-attention kind"
        log.warning("%s: the search copies the prompt into every row (no shared prefix): %s", adapter.family, why)


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
    if attention == "cascade" and not shared and jobs:
        _say_per_row(jobs[0][0].policy.adapter)
    parents = [(j, part, cap) for j, (_, partials, caps) in enumerate(jobs)
               for part, cap in zip(partials, caps, strict=True)]
    per_chunk = len(parents) if max_rows is None else max(1, max_rows // settings.num_beams)
    # Padding between prompt and response takes places in a sliding window:
    # such a model expands partials of one length per batch (the adapter says).
    equal = not shared and bool(jobs) and not jobs[0][0].policy.adapter.pads_rows(jobs[0][0].policy.model)
    found: dict[int, list[TokenBeam]] = {}
    for indices in _chunks(parents, per_chunk, equal):
        chunk = [parents[i] for i in indices]
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
        found.update(zip(indices, group_beam_search(first, rows.step, chunk_caps, settings), strict=True))
        if stats is not None:
            stats.forward_passes += rows.forward_passes
            stats.rows_forwarded += rows.rows_forwarded
            stats.peak_kv_bytes = max(stats.peak_kv_bytes, rows.peak_kv_bytes)
            stats.tokens += int(rows.tokens)
            stats.attended += int(rows.attended)
            stats.logit_rows += rows.logit_rows
    out: list[list[list[TokenBeam]]] = [[] for _ in jobs]
    for i, (j, _, _) in enumerate(parents):
        out[j].append(found[i])
    return out


def _chunks(parents: Sequence[tuple], per_chunk: int, equal_lengths: bool) -> list[list[int]]:
    """Indices of the parents of each batch: consecutive runs of `per_chunk`,
    or, with `equal_lengths`, runs of partials of one length each."""
    if not equal_lengths:
        return [list(range(s, min(s + per_chunk, len(parents)))) for s in range(0, len(parents), per_chunk)]
    by_length: dict[tuple[int, int], list[int]] = {}
    for i, (j, part, _) in enumerate(parents):
        by_length.setdefault((j, len(part)), []).append(i)
    return [group[s : s + per_chunk] for group in by_length.values() for s in range(0, len(group), per_chunk)]


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
