"""The KV caches behind the beam search's rows.

- `_BufferLayer` / `CachedRows`: the plain per-row path. Every row holds
  its own copy of the prompt prefix in a preallocated buffer; rows stay in
  place as beams finish or fork and only moved rows are copied. Used by the
  released-code-style baseline and as the reference the shared-prefix path
  is tested against.
- `CascadeRows`: the shared-prefix path. The prefix KV is held once per
  prompt (`cascade_attention.PrefixKV`); rows hold only their own tokens
  (`cascade_attention.SuffixCache`), and one forward pass serves the rows of
  several prompts.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

from csr.engine.search.cascade_attention import (
    STATE_KWARG,
    CascadeState,
    PrefixKV,
    SuffixCache,
    cascade_attention,
    row_groups,
)


class _BufferLayer(DynamicLayer):
    """A KV-cache layer that writes new tokens into a preallocated buffer.

    transformers' DynamicLayer concatenates on every token, copying the whole
    cache each step; with tens of beams over a long image prefix that copy
    was three quarters of the search's time. Reordering copies only the
    filled part.
    """

    is_sliding = False
    is_compileable = False
    is_initialized = True

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, capacity: int):
        # No super().__init__(): it would assign the `keys`/`values` properties.
        rows, heads, length, dim = keys.shape
        self._k = keys.new_empty(rows, heads, max(capacity, length), dim)
        self._v = values.new_empty(rows, values.shape[1], max(capacity, length), values.shape[-1])
        self._k[:, :, :length] = keys
        self._v[:, :, :length] = values
        self._len = length
        self.dtype, self.device = keys.dtype, keys.device

    @property
    def keys(self) -> torch.Tensor:
        return self._k[:, :, : self._len]

    @property
    def values(self) -> torch.Tensor:
        return self._v[:, :, : self._len]

    def _grow(self, needed: int) -> None:
        capacity = max(needed, 2 * self._k.shape[2])
        for name in ("_k", "_v"):
            old = getattr(self, name)
            new = old.new_empty(old.shape[0], old.shape[1], capacity, old.shape[3])
            new[:, :, : self._len] = old[:, :, : self._len]
            setattr(self, name, new)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        n = key_states.shape[-2]
        if self._len + n > self._k.shape[2]:
            self._grow(self._len + n)
        self._k[:, :, self._len : self._len + n] = key_states
        self._v[:, :, self._len : self._len + n] = value_states
        self._len += n
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self._len

    def get_max_length(self) -> int:
        return -1

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self._len + query_length, 0

    def move_rows(self, dest: torch.Tensor, src: torch.Tensor) -> None:
        """Copy rows `src` onto rows `dest` (disjoint), filled part only."""
        for buf in (self._k, self._v):
            buf[dest, :, : self._len] = buf[src, :, : self._len]

    def truncate_rows(self, rows: int) -> None:
        self._k, self._v = self._k[:rows], self._v[:rows]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        beam_idx = beam_idx.to(self._k.device)
        for name in ("_k", "_v"):
            old = getattr(self, name)
            new = old.new_empty(beam_idx.numel(), old.shape[1], old.shape[2], old.shape[3])
            new[:, :, : self._len] = old[:, :, : self._len].index_select(0, beam_idx)
            setattr(self, name, new)

    batch_select_indices = reorder_cache


def buffer_cache(layers: list[tuple[torch.Tensor, torch.Tensor]], capacity: int) -> DynamicCache:
    cache = DynamicCache()
    cache.layers = [_BufferLayer(k, v, capacity) for k, v in layers]
    return cache


def is_plain_cache(cache) -> bool:
    """Full-attention layers only: what `_BufferLayer` can stand in for."""
    return not any(getattr(cache, "is_sliding", [False])) and all(
        type(layer) in (DynamicLayer, _BufferLayer) for layer in getattr(cache, "layers", [None])
    )


def _assign_slots(wanted: list[int]) -> tuple[list[int], list[int], list[int]]:
    """Where each new row goes in a batch of len(wanted) rows, moving as few as possible.

    `wanted[i]` is the current row that new row i continues. A current row
    below len(wanted) keeps its place for its first continuation; the others
    (rows past the end, second continuations of one beam) are copied into
    the free places. Returns (slot of each new row, destinations, sources).
    """
    n = len(wanted)
    slot: list[int | None] = [None] * n
    kept = set()
    for i, row in enumerate(wanted):
        if row < n and row not in kept:
            slot[i] = row
            kept.add(row)
    free = iter(r for r in range(n) if r not in kept)
    dest, src = [], []
    for i, row in enumerate(wanted):
        if slot[i] is None:
            slot[i] = next(free)
            dest.append(slot[i])
            src.append(row)
    return slot, dest, src  # type: ignore[return-value]


class CachedRows:
    """Model state for a batch of rows that share the prompt prefix: the KV
    cache, the 2-D attention mask and each row's next position id.

    Beam search keeps, drops and duplicates rows at every token. Rather than
    gathering the whole cache into a new order each step (a copy of every
    row, the prompt prefix included), rows stay where they are and only the
    rows that must move are copied; `slot` maps the search's row order to
    the cache's.
    """

    def __init__(self, model, cache, mask: torch.Tensor, next_pos: torch.Tensor, position_ids=None):
        self.model, self.cache, self.mask, self.next_pos = model, cache, mask, next_pos
        # Sequence indices (rows, n) -> the model's position ids (the family's adapter).
        self.position_ids = position_ids or (lambda positions: positions)
        self.slot = torch.arange(mask.shape[0], device=mask.device)
        self.in_place = all(isinstance(layer, _BufferLayer) for layer in getattr(cache, "layers", [None]))
        self.forward_passes = 0
        self.rows_forwarded = 0
        # For the bench's FLOP count, as CascadeRows counts them: real query
        # tokens, the keys they attend summed over them, rows of logits
        # (tensors, so that counting never waits for the device).
        self.tokens = torch.zeros((), dtype=torch.long, device=mask.device)
        self.attended = torch.zeros((), dtype=torch.long, device=mask.device)
        self.logit_rows = 0
        self.peak_kv_bytes = self.kv_bytes()

    def count(self, valid: torch.Tensor) -> None:
        """Count a forward pass whose new columns (the mask's last) hold `valid` (rows, n) real tokens."""
        # Keys before the new columns once per row, then a running count over the
        # new ones only: a cumsum over the whole mask would cost every token step
        # a pass over every row's full length.
        n = valid.shape[1]
        seen = self.mask[:, :-n].sum(dim=1, keepdim=True) + self.mask[:, -n:].long().cumsum(dim=1)
        self.tokens += valid.sum()
        self.attended += (seen * valid).sum()
        self.logit_rows += valid.shape[0]

    def kv_bytes(self) -> int:
        """Bytes held by the cache buffers (every row's copy of the prefix included)."""
        total = 0
        for layer in getattr(self.cache, "layers", []):
            for name in ("_k", "_v", "keys", "values"):
                t = getattr(layer, name, None)
                if isinstance(t, torch.Tensor):
                    total += t.numel() * t.element_size()
                    if name == "_v":
                        break
        return total

    def _rearrange(self, wanted: torch.Tensor) -> None:
        if not self.in_place or wanted.numel() > self.mask.shape[0]:
            # More rows than now (the first step fans each parent out into its
            # beams), or a cache we cannot edit in place: gather a new batch.
            self.cache.reorder_cache(wanted)
            self.mask, self.next_pos = self.mask[wanted], self.next_pos[wanted]
            self.slot = torch.arange(wanted.numel(), device=wanted.device)
            return
        slot, dest, src = _assign_slots(wanted.tolist())
        n = len(slot)
        if dest:
            d = torch.tensor(dest, device=wanted.device)
            r = torch.tensor(src, device=wanted.device)
            for layer in self.cache.layers:
                layer.move_rows(d, r)
            self.mask[d] = self.mask[r]
            self.next_pos[d] = self.next_pos[r]
        for layer in self.cache.layers:
            layer.truncate_rows(n)
        self.mask, self.next_pos = self.mask[:n], self.next_pos[:n]
        self.slot = torch.tensor(slot, device=wanted.device)

    def step(self, rows: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        self._rearrange(self.slot[rows])
        feed = torch.empty_like(tokens)
        feed[self.slot] = tokens
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], 1)], dim=1)
        self.count(self.mask[:, -1:])
        with torch.inference_mode():
            out = self.model(
                input_ids=feed[:, None],
                attention_mask=self.mask,
                position_ids=self.position_ids(self.next_pos[:, None]),
                past_key_values=self.cache,
                use_cache=True,
                logits_to_keep=1,
            )
        self.next_pos = self.next_pos + 1
        self.forward_passes += 1
        self.rows_forwarded += int(feed.numel())
        self.peak_kv_bytes = max(self.peak_kv_bytes, self.kv_bytes())
        return out.logits[self.slot, -1]



class CascadeRows:
    """Model state for a batch of rows over one or several prompt prefixes:
    the rows' suffix KV, each row's prompt and next position id.

    Same row bookkeeping as `CachedRows` (rows stay in place, `slot` maps
    the search's row order to the cache's), but a moved or forked row copies
    its own suffix only: the prefix is shared by every row of its prompt.
    """

    def __init__(
        self,
        model,
        prefixes: Sequence[PrefixKV],
        row_prompt: torch.Tensor,
        next_pos: torch.Tensor,
        capacity: int,
        position_ids=None,
    ):
        layers = len(prefixes[0].keys)
        kv_heads, _, head_dim = prefixes[0].keys[0].shape
        first = prefixes[0].keys[0]
        self.model, self.prefixes = model, list(prefixes)
        self.row_prompt, self.next_pos = row_prompt, next_pos
        # (sequence indices (rows, n), each row's prompt) -> the model's position ids (the family's adapter).
        self.position_ids = position_ids or (lambda positions, row_prompt: positions)
        self.cache = SuffixCache(
            layers, row_prompt.numel(), kv_heads, head_dim, capacity, first.dtype, first.device
        )
        self.slot = torch.arange(row_prompt.numel(), device=row_prompt.device)
        self.prefix_lengths = torch.tensor([p.length for p in self.prefixes], device=row_prompt.device)
        self.forward_passes = 0
        self.rows_forwarded = 0
        # For the bench's FLOP count: real (unpadded) query tokens, and the
        # keys they attend summed over those tokens (per layer).
        self.logit_rows = 0
        self.tokens = torch.zeros((), dtype=torch.long, device=row_prompt.device)
        self.attended = torch.zeros((), dtype=torch.long, device=row_prompt.device)
        self.peak_kv_bytes = sum(p.nbytes for p in self.prefixes) + self.cache.nbytes

    def _count(self, valid: torch.Tensor) -> None:
        end = self.cache.length + valid.shape[1]
        seen = self.cache.valid[:, :end].long().cumsum(dim=1)[:, -valid.shape[1] :]
        keys = seen + self.prefix_lengths[self.row_prompt][:, None]
        self.tokens += valid.sum()
        self.attended += (keys * valid).sum()

    def forward(self, ids: torch.Tensor, valid: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Run `ids` (rows, n) with their `valid` mask and position ids; the last position's logits."""
        self.cache.begin(valid)
        self._count(valid)
        self.peak_kv_bytes = max(self.peak_kv_bytes, sum(p.nbytes for p in self.prefixes) + self.cache.nbytes)
        groups = row_groups(self.row_prompt, len(self.prefixes))
        state = CascadeState(self.prefixes, groups, self.cache, has_padding=not bool(valid.all()))
        try:
            with torch.inference_mode(), cascade_attention(self.model):
                out = self.model(
                    input_ids=ids,
                    position_ids=self.position_ids(positions, self.row_prompt),
                    past_key_values=self.cache,
                    use_cache=True,
                    logits_to_keep=1,
                    **{STATE_KWARG: state},
                )
        finally:
            self.cache.commit()
        self.forward_passes += 1
        self.rows_forwarded += int(ids.numel())
        self.logit_rows += ids.shape[0]
        return out.logits[:, -1]

    def _rearrange(self, wanted: torch.Tensor) -> None:
        if wanted.numel() > self.cache.rows:
            # The first step fans each parent out into its beams: a new batch of suffixes.
            self.cache.select_rows(wanted)
            self.row_prompt, self.next_pos = self.row_prompt[wanted], self.next_pos[wanted]
            self.slot = torch.arange(wanted.numel(), device=wanted.device)
            return
        slot, dest, src = _assign_slots(wanted.tolist())
        n = len(slot)
        if dest:
            d = torch.tensor(dest, device=wanted.device)
            r = torch.tensor(src, device=wanted.device)
            self.cache.move_rows(d, r)
            self.row_prompt[d] = self.row_prompt[r]
            self.next_pos[d] = self.next_pos[r]
        self.cache.truncate_rows(n)
        self.row_prompt, self.next_pos = self.row_prompt[:n], self.next_pos[:n]
        self.slot = torch.tensor(slot, device=wanted.device)

    def step(self, rows: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        self._rearrange(self.slot[rows])
        feed = torch.empty_like(tokens)
        feed[self.slot] = tokens
        valid = torch.ones(feed.numel(), 1, dtype=torch.bool, device=feed.device)
        logits = self.forward(feed[:, None], valid, self.next_pos[:, None])
        self.next_pos = self.next_pos + 1
        return logits[self.slot]
