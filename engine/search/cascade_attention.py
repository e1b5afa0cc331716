"""Shared-prefix ("cascade") attention for the beam search.

Every row of a prompt's search (partial responses x token beams) starts with
the same prefix: image features and prompt tokens, 577+ positions against a
response of tens. The plain path keeps a copy of the prefix KV in every row
and attends over it row by row (one matrix-vector product per row and head).
Here the prefix KV is stored once per prompt (`PrefixKV`), only the rows'
own response tokens live in a per-row buffer (`SuffixCache`), and attention
is split in two (Hydragen, arXiv 2402.05099; FlashInfer's cascade attention):

- all rows of a prompt against its prefix keys, one matrix-matrix product
  (queries of every row and head stacked: (kv heads, rows x q, dim) x
  (kv heads, dim, prefix));
- each row against its own suffix keys, masked for padding and causality;
- the two partial softmaxes merged exactly with their log-sum-exp.

Forks copy a row's suffix only; the prefix is shared, never copied.

The split plugs into transformers through its attention interface: the
function is registered under `ATTN_NAME`, the model's attention configs are
switched to it only for the duration of a search forward pass
(`cascade_forward`), and the per-batch state travels as a keyword argument
that transformers hands down to every attention call. Nothing in
transformers is patched; the prompt's own forward (vision tower, prefill)
runs with the model's usual attention.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from transformers import AttentionInterface

from csr.engine.models.attention import attention_implementation

ATTN_NAME = "csr_cascade"
STATE_KWARG = "csr_cascade"


# --------------------------------------------------------------------------- storage


class PrefixKV:
    """One prompt's prefix keys and values, per layer (kv heads, length, dim), batch dimension dropped."""

    def __init__(self, layers: Sequence[tuple[torch.Tensor, torch.Tensor]]):
        self.keys = [k[0].contiguous() for k, _ in layers]
        self.values = [v[0].contiguous() for _, v in layers]
        self.length = int(self.keys[0].shape[1])

    @classmethod
    def from_cache(cls, cache) -> PrefixKV:
        return cls([(k, v) for k, v, *_ in cache])

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))


class SuffixCache:
    """The rows' own tokens (partial response and new tokens), per layer in a
    preallocated buffer (rows, kv heads, capacity, dim), with a validity mask
    per column (padding between rows of different lengths is invalid).

    transformers calls `update(keys, values, layer_idx)` in every attention
    layer; the new tokens go into the columns after `length`, which advances
    once the forward pass is over (`commit`), so that every layer writes to
    the same columns.
    """

    def __init__(self, n_layers: int, rows: int, kv_heads: int, head_dim: int, capacity: int, dtype, device):
        shape = (rows, kv_heads, max(capacity, 1), head_dim)
        self.keys = [torch.empty(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.values = [torch.empty(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.valid = torch.zeros(rows, shape[2], dtype=torch.bool, device=device)
        self.length = 0
        self.pending = 0

    @property
    def rows(self) -> int:
        return self.valid.shape[0]

    @property
    def capacity(self) -> int:
        return self.valid.shape[1]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    def begin(self, valid: torch.Tensor) -> None:
        """Open `valid.shape[1]` new columns for the next forward pass, `valid` (rows, n) marking real tokens."""
        n = valid.shape[1]
        if self.length + n > self.capacity:
            self._grow(self.length + n)
        self.valid[:, self.length : self.length + n] = valid
        self.pending = n

    def commit(self) -> None:
        self.length += self.pending
        self.pending = 0

    def _grow(self, needed: int) -> None:
        capacity = max(needed, 2 * self.capacity)
        for store in (self.keys, self.values):
            for i, old in enumerate(store):
                new = old.new_empty(old.shape[0], old.shape[1], capacity, old.shape[3])
                new[:, :, : self.length] = old[:, :, : self.length]
                store[i] = new
        valid = self.valid.new_zeros(self.rows, capacity)
        valid[:, : self.length] = self.valid[:, : self.length]
        self.valid = valid

    # The interface transformers' attention layers call.
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        end = self.length + key_states.shape[-2]
        self.keys[layer_idx][:, :, self.length : end] = key_states
        self.values[layer_idx][:, :, self.length : end] = value_states
        return self.keys[layer_idx][:, :, :end], self.values[layer_idx][:, :, :end]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length

    # Row bookkeeping for the beam search: only suffixes ever move.
    def move_rows(self, dest: torch.Tensor, src: torch.Tensor) -> None:
        """Copy rows `src` onto rows `dest` (disjoint), filled part only."""
        for buf in (*self.keys, *self.values):
            buf[dest, :, : self.length] = buf[src, :, : self.length]
        self.valid[dest] = self.valid[src]

    def truncate_rows(self, rows: int) -> None:
        self.keys = [k[:rows] for k in self.keys]
        self.values = [v[:rows] for v in self.values]
        self.valid = self.valid[:rows]

    def select_rows(self, index: torch.Tensor) -> None:
        """A new batch of rows `index` (repeats allowed): the first step's fan-out into beams."""
        for store in (self.keys, self.values):
            for i, old in enumerate(store):
                new = old.new_empty(index.numel(), *old.shape[1:])
                new[:, :, : self.length] = old[:, :, : self.length].index_select(0, index)
                store[i] = new
        self.valid = self.valid.index_select(0, index)


@dataclass
class CascadeState:
    """What every attention layer needs besides its own query/key/value:
    the prompts' prefixes, which rows belong to which prompt, and the suffix
    validity mask. `groups` is None when every row belongs to prefix 0."""

    prefixes: Sequence[PrefixKV]
    groups: list[tuple[int, torch.Tensor]] | None
    cache: SuffixCache
    # Whether a query of this pass may see no suffix key: one that is padding
    # itself (a real token always sees its own key).
    has_padding: bool = True
    blocked: torch.Tensor | None = None  # the suffix mask, once per forward pass (`_blocked`)


def row_groups(row_prompt: torch.Tensor, n_prompts: int) -> list[tuple[int, torch.Tensor]] | None:
    """Rows of each prompt, for the per-prompt prefix products; None for a single prompt."""
    if n_prompts == 1:
        return None
    groups = []
    for p in range(n_prompts):
        rows = (row_prompt == p).nonzero(as_tuple=True)[0]
        if rows.numel():
            groups.append((p, rows))
    return groups


# --------------------------------------------------------------------------- attention


def _partial(scores: torch.Tensor, values: torch.Tensor, may_be_empty: bool = False):
    """Unnormalised softmax(scores) @ values with its running max and sum (float32).

    `scores` is consumed (overwritten). A query that sees no key here (all
    masked; only `may_be_empty` parts can have one) gets max 0, sum 0,
    output 0, so that the merge takes the other part alone."""
    top = scores.amax(dim=-1, keepdim=True)
    if may_be_empty:
        top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    weights = scores.sub_(top).exp_()
    total = weights.sum(dim=-1, keepdim=True)
    out = torch.matmul(weights.to(values.dtype), values).float()
    return out, top, total


# The fused CPU attention kernel that also returns each query's log-sum-exp:
# one blocked pass over the prefix keys and values instead of two products and
# the softmax between them (the prefix part reads 1 MB or more of KV per layer
# for a handful of rows, and the unfused products were bound by those reads).
_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def _prefix_part(query: torch.Tensor, prefix_k: torch.Tensor, prefix_v: torch.Tensor, scaling: float):
    """query (n, kv heads, group, q, dim) against one prompt's prefix: one
    product per kv head with every row's queries stacked. Returns (out, top,
    total) as `_partial`; total is None where out is already normalised (the
    fused kernel's, whose top is the log-sum-exp)."""
    n, kvh, group, q_len, dim = query.shape
    stacked = query.permute(1, 0, 2, 3, 4).reshape(kvh, n * group * q_len, dim)

    def back(t: torch.Tensor) -> torch.Tensor:
        return t.view(kvh, n, group, q_len, -1).permute(1, 0, 2, 3, 4)

    if _FLASH_CPU is not None and query.device.type == "cpu" and query.dtype == torch.float32:
        out, lse = _FLASH_CPU(stacked[None], prefix_k[None], prefix_v[None], scale=scaling)
        return back(out[0]), back(lse[0, ..., None]), None
    scores = torch.matmul(stacked, prefix_k.transpose(1, 2)).float().mul_(scaling)
    out, top, total = _partial(scores, prefix_v)
    return back(out), back(top), back(total)


def _blocked(state: CascadeState, rows: int, s_len: int, q_len: int, device) -> torch.Tensor:
    """The suffix keys each query may not see, (rows, 1, 1, q, S): padding,
    and with several new tokens the later ones. The same in every layer of a
    forward pass: built once, at the first layer."""
    if state.blocked is None or state.blocked.shape[-1] != s_len:
        allowed = state.cache.valid[:rows, :s_len][:, None, :]  # (R, 1, S)
        if q_len > 1:
            columns = torch.arange(s_len, device=device)
            last_seen = torch.arange(s_len - q_len, s_len, device=device)
            allowed = allowed & (columns[None, :] <= last_seen[:, None])[None]  # (R, q, S)
        state.blocked = ~allowed[:, None, None]
    return state.blocked


def cascade_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention-interface function: `key`/`value` are the rows'
    suffixes (what `SuffixCache.update` returned); the prefix comes from the
    state. Returns (rows, q, heads, dim) as transformers' sdpa does."""
    state: CascadeState | None = kwargs.get(STATE_KWARG)
    if state is None:
        raise RuntimeError(f"{ATTN_NAME} attention needs the `{STATE_KWARG}` state (use cascade_forward)")
    layer = module.layer_idx
    rows, heads, q_len, dim = query.shape
    kvh = key.shape[1]
    group = heads // kvh
    if scaling is None:
        scaling = dim**-0.5
    q5 = query.view(rows, kvh, group, q_len, dim)

    # Suffix part: each row against its own keys, padding and causality masked.
    s_len = key.shape[2]
    scores = torch.matmul(q5, key.unsqueeze(2).transpose(-1, -2)).float().mul_(scaling)  # (R, kvh, g, q, S)
    scores.masked_fill_(_blocked(state, rows, s_len, q_len, query.device), float("-inf"))
    out, top, total = _partial(scores, value.unsqueeze(2), may_be_empty=state.has_padding)

    # Prefix part, per prompt, merged into the suffix part with the log-sum-exp.
    groups = state.groups if state.groups is not None else [(0, None)]
    for prompt, index in groups:
        prefix = state.prefixes[prompt]
        q_sel = q5 if index is None else q5.index_select(0, index)
        p_out, p_top, p_total = _prefix_part(q_sel, prefix.keys[layer], prefix.values[layer], scaling)
        if index is None:
            s_out, s_top, s_total = out, top, total
        else:
            s_out, s_top, s_total = out[index], top[index], total[index]
        peak = torch.maximum(s_top, p_top)
        a, b = torch.exp(s_top - peak), torch.exp(p_top - peak)
        if p_total is None:  # normalised prefix part: its sum is 1 at its own scale
            merged = (s_out * a + p_out * b) / (s_total * a + b)
        else:
            merged = (s_out * a + p_out * b) / (s_total * a + p_total * b)
        if index is None:
            out = merged
        else:
            out = out.index_copy(0, index, merged)
    result = out.to(query.dtype).view(rows, heads, q_len, dim).transpose(1, 2).contiguous()
    return result, None


AttentionInterface.register(ATTN_NAME, cascade_attention_forward)


def _attention_configs(model) -> list:
    """The configs the model's attention layers read `_attn_implementation` from."""
    cached = getattr(model, "_csr_attention_configs", None)
    if cached is None:
        seen: dict[int, object] = {}
        for module in model.modules():
            config = getattr(module, "config", None)
            # Decoder self-attention: causal, indexed by layer (the vision tower's is neither).
            if hasattr(module, "layer_idx") and config is not None and getattr(module, "is_causal", False):
                seen[id(config)] = config
        cached = list(seen.values())
        model._csr_attention_configs = cached
    return cached


def supports_cascade(model) -> bool:
    """Whether the model's decoder attention can be switched to the cascade function."""
    return bool(_attention_configs(model))


@contextmanager
def cascade_attention(model) -> Iterator[None]:
    """The model's decoder attention runs `cascade_attention_forward` inside the block.

    Switched per forward pass rather than once for all, so that anything
    else that runs the model (the prompt prefill, a generate() call,
    training) keeps its own attention and masks. An implementation name
    transformers has no mask function for also makes it skip building the
    4-D mask, which the cascade attention does not need."""
    configs = _attention_configs(model)
    with attention_implementation(configs, ATTN_NAME):
        yield


def text_shapes(model) -> tuple[int, int, int]:
    """(layers, kv heads, head dim) of the model's language model."""
    config = model.config.get_text_config()
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, kv_heads, head_dim


def kv_bytes_per_token(layers: int, kv_heads: int, head_dim: int, dtype_bytes: int) -> int:
    """Keys and values of one token over all layers."""
    return 2 * layers * kv_heads * head_dim * dtype_bytes
