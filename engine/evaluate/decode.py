"""Greedy batched decoding for the benchmarks, equal to `generate` token for token.

CHAIR and POPE decode greedily (one group, one beam): each prompt has one
row, so its prefix (prompt and image tokens) is held once per prompt either
way, and the shared-prefix attention of the search (engine/search/
cascade_attention.py) would add per-prompt work without sharing anything.
What costs `generate` its time on these shapes is elsewhere, and is what this
decoder does differently:

- one KV cache per batch, preallocated (`RowCache`): transformers' dynamic
  cache concatenates every layer's keys and values on every token, a copy of
  every row's whole prefix per step;
- rows are ragged: each holds its own prompt's tokens from column 0 and
  writes its next token at its own column, with a 4-D mask saying which
  columns it sees and explicit position ids, so prompts of different lengths
  share a batch without padding;
- a row that ends (EOS or `max_new_tokens`, as `generate` stops) leaves the
  batch at once and the next prompt of the benchmark takes its place
  (continuous batching); `generate` runs every row of a batch until the
  longest one ends.

The next token is the argmax of the float32 logits, as greedy `generate`
picks it; nothing is masked (the evaluation's `generate` masks nothing).
Models whose `generate` would do more than that (logits processors in their
generation config, sliding-window or non-LLaVA decoders) are refused by
`unsupported`, and the caller falls back to `generate`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from transformers import GenerationConfig
from transformers.cache_utils import DynamicLayer

# Which families this decoder covers is the adapter's `engine_decode` (LLaVA-1.5:
# image features spliced into a decoder with 1-D rotary positions); others,
# LLaVA-NeXT included until a test covers its tiles, use `generate`.

# What greedy `generate` would apply beyond argmax when the generation config sets it.
_PROCESSING = (
    "repetition_penalty", "encoder_repetition_penalty", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size",
    "bad_words_ids", "min_length", "min_new_tokens", "forced_bos_token_id", "forced_eos_token_id",
    "suppress_tokens", "begin_suppress_tokens", "sequence_bias", "exponential_decay_length_penalty",
    "stop_strings", "guidance_scale", "watermarking_config", "max_time", "forced_decoder_ids",
)


def unsupported(model) -> str | None:
    """Why this decoder would not equal greedy `generate` on `model`; None when it does."""
    from csr.engine.models import ADAPTERS, UnsupportedModelError, adapter_for

    try:
        adapter = adapter_for(model)
    except UnsupportedModelError as exc:
        return str(exc)
    if not adapter.engine_decode:
        covered = ", ".join(a.family for a in ADAPTERS if a.engine_decode)
        return f"the {adapter.family} family is not covered by the engine's decoder (covered: {covered})"
    text = model.config.get_text_config()
    attention = getattr(text, "_attn_implementation", None) or "eager"
    if attention not in ("sdpa", "eager"):
        return f"attention implementation {attention!r} (sdpa or eager only)"
    if getattr(text, "sliding_window", None) is not None and getattr(text, "use_sliding_window", True):
        return "a sliding-window decoder"
    if any(kind != "full_attention" for kind in getattr(text, "layer_types", None) or ()):
        return "layers other than full attention"
    config, neutral = model.generation_config, GenerationConfig()
    for name in _PROCESSING:
        value = getattr(config, name, None)
        if value not in (None, getattr(neutral, name, None), 0, 1.0, [], {}):
            return f"its generation config sets {name}={value!r}"
    return None


def stop_ids(model) -> frozenset[int]:
    """The ids that end a row: the generation config's EOS, one id or several, as `generate` reads it."""
    eos = model.generation_config.eos_token_id
    if eos is None:
        return frozenset()
    return frozenset(int(i) for i in (eos if isinstance(eos, (list, tuple)) else [eos]))


class RowCache:
    """Keys and values of the rows in flight, per layer (rows, kv heads,
    capacity, dim). Row r holds its own tokens in columns [0, length r);
    a forward pass writes each row's new token at its own column, so rows
    at different lengths (prompts of different lengths, rows admitted at
    different steps) share one buffer. The layer interface transformers
    calls is `update` and `get_seq_length`."""

    def __init__(self, layers: int, rows: int, kv_heads: int, head_dim: int, capacity: int, dtype, device):
        # Zeros, not empty: a row attends to columns it never wrote, masked out,
        # and 0 x NaN from uninitialised memory would still be NaN.
        shape = (rows, kv_heads, capacity, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.lengths: list[int] = []  # per row in flight (rows 0..n-1)
        self._write: torch.Tensor | None = None  # each row's column for this pass
        self._rows: torch.Tensor | None = None  # 0..rows-1, for the writes
        self._span = 0

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]

    @property
    def rows(self) -> int:
        return len(self.lengths)

    def ensure_capacity(self, needed: int) -> None:
        if needed <= self.capacity:
            return
        span = max(self.lengths, default=0)
        for store in (self.keys, self.values):
            for i, old in enumerate(store):
                new = old.new_zeros(old.shape[0], old.shape[1], needed, old.shape[3])
                new[:, :, :span] = old[:, :, :span]
                store[i] = new

    def put(self, row: int, layers: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Row `row` (== rows, appended) holds a prompt's prefill keys and values, each (kv heads, length, dim)."""
        assert row == self.rows
        length = layers[0][0].shape[1]
        for i, (k, v) in enumerate(layers):
            self.keys[i][row, :, :length] = k
            self.values[i][row, :, :length] = v
        self.lengths.append(length)

    def begin(self) -> torch.Tensor:
        """Opens one column per row for the next pass; returns the mask (rows, span) of the columns each row sees."""
        device = self.keys[0].device
        self._write = torch.tensor(self.lengths, device=device)
        self._rows = torch.arange(self.rows, device=device)
        self._span = max(self.lengths) + 1
        return torch.arange(self._span, device=device)[None, :] <= self._write[:, None]

    def commit(self) -> None:
        self.lengths = [n + 1 for n in self.lengths]
        self._write = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        rows = key_states.shape[0]
        k, v = self.keys[layer_idx], self.values[layer_idx]
        k[self._rows, :, self._write] = key_states[:, :, 0]
        v[self._rows, :, self._write] = value_states[:, :, 0]
        return k[:rows, :, : self._span], v[:rows, :, : self._span]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self._span - 1

    def drop(self, finished: Sequence[bool]) -> list[int]:
        """Removes the finished rows: the rows that stay past the new end move
        into the freed places (their filled columns only). Returns, for each
        new row, the old row it was."""
        n = len(finished)
        keep = [r for r in range(n) if not finished[r]]
        m = len(keep)
        holes = [r for r in range(m) if finished[r]]
        movers = [r for r in keep if r >= m]
        if movers:
            span = max(self.lengths[r] for r in movers)
            dest = torch.tensor(holes, device=self.keys[0].device)
            src = torch.tensor(movers, device=self.keys[0].device)
            for buf in (*self.keys, *self.values):
                buf[dest, :, :span] = buf[src, :, :span]
        order = list(range(m))
        for hole, mover in zip(holes, movers, strict=True):
            order[hole] = mover
        self.lengths = [self.lengths[r] for r in order]
        return order


@dataclass
class DecodeStats:
    forward_passes: int = 0  # decode steps (one token for every row in flight)
    prefills: int = 0  # prompt forward passes (several equal-length prompts in one)
    rows_forwarded: int = 0  # sum over steps of the rows in flight
    new_tokens: int = 0  # tokens kept in the outputs


def _prefill_groups(encoded: list[dict]) -> list[list[int]]:
    """Indices of prompts that can run in one prefill: same token count and same tensor shapes."""
    groups: dict[tuple, list[int]] = {}
    for i, inputs in enumerate(encoded):
        key = tuple((name, tuple(v.shape)) for name, v in sorted(inputs.items()) if isinstance(v, torch.Tensor))
        groups.setdefault(key, []).append(i)
    return list(groups.values())


def greedy_decode(
    policy,
    images: Sequence,
    prompts: Sequence[str],
    max_new_tokens: int,
    batch_size: int = 16,
    load_image: Callable = lambda image: image,
    stats: DecodeStats | None = None,
) -> list[list[int]]:
    """Greedy new token ids for each (image, prompt), each ending at its first
    stop id (kept) or after `max_new_tokens`: what `generate(do_sample=False,
    num_beams=1)` returns for it, without the padding after the stop. At most
    `batch_size` rows in flight; `load_image` opens an image when its prompt
    is admitted."""
    if len(images) != len(prompts):
        raise ValueError("images and prompts differ in number")
    model = policy.model
    stops = stop_ids(model)
    stats = stats if stats is not None else DecodeStats()
    out: list[list[int]] = [[] for _ in prompts]
    if not prompts or max_new_tokens < 1:
        return out
    text = model.config.get_text_config()
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    eager = (getattr(text, "_attn_implementation", None) or "eager") == "eager"
    cache: RowCache | None = None
    prompt_of: list[int] = []  # the prompt each row in flight decodes
    last: list[int] = []  # each row's newest token, fed at the next step
    waiting = 0  # next prompt to admit

    def record(rows: Sequence[int], tokens: Sequence[int]) -> list[bool]:
        done = []
        for r, token in zip(rows, tokens, strict=True):
            mine = out[prompt_of[r]]
            mine.append(token)
            done.append(token in stops or len(mine) >= max_new_tokens)
        stats.new_tokens += len(tokens)
        return done

    def drop(finished: list[bool]) -> None:
        nonlocal prompt_of, last
        if any(finished):
            order = cache.drop(finished)
            prompt_of = [prompt_of[r] for r in order]
            last = [last[r] for r in order]

    with torch.inference_mode():
        while True:
            # Admit waiting prompts into the free rows; a prompt whose first token ends it leaves at once.
            while waiting < len(prompts) and len(prompt_of) < batch_size:
                take = list(range(waiting, min(len(prompts), waiting + batch_size - len(prompt_of))))
                waiting = take[-1] + 1
                encoded = [policy.encode(load_image(images[p]), prompts[p]) for p in take]
                for group in _prefill_groups(encoded):
                    batch = {name: torch.cat([encoded[i][name] for i in group])
                             if isinstance(encoded[group[0]][name], torch.Tensor) else encoded[group[0]][name]
                             for name in encoded[group[0]]}
                    result = model(**batch, use_cache=True, logits_to_keep=1)
                    stats.prefills += 1
                    layers = result.past_key_values.layers
                    if any(type(layer) is not DynamicLayer for layer in layers):
                        raise NotImplementedError("the model's cache has layers other than full attention")
                    length = layers[0].keys.shape[2]
                    if cache is None:
                        first = layers[0].keys
                        cache = RowCache(len(layers), batch_size, kv_heads, head_dim, length + max_new_tokens,
                                         first.dtype, first.device)
                    cache.ensure_capacity(length + max_new_tokens)
                    tokens = result.logits[:, -1].float().argmax(dim=-1).tolist()
                    rows = []
                    for j, i in enumerate(group):
                        rows.append(cache.rows)
                        cache.put(cache.rows, [(layer.keys[j], layer.values[j]) for layer in layers])
                        prompt_of.append(take[i])
                        last.append(tokens[j])
                    drop_mask = [False] * cache.rows
                    for r, done in zip(rows, record(rows, tokens), strict=True):
                        drop_mask[r] = done
                    drop(drop_mask)
            if not prompt_of:
                return out
            # One token for every row in flight.
            mask = cache.begin()[:, None, None, :]  # (rows, 1, 1, span): a 4-D mask goes to attention as it is
            if eager:  # eager attention adds its mask
                mask = torch.zeros(mask.shape, dtype=model.dtype, device=mask.device).masked_fill(
                    ~mask, torch.finfo(model.dtype).min)
            device = cache.keys[0].device
            positions = torch.tensor(cache.lengths, device=device)[:, None]
            ids = torch.tensor(last, device=device)[:, None]
            try:
                logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                               use_cache=True, logits_to_keep=1).logits
            finally:
                cache.commit()
            stats.forward_passes += 1
            stats.rows_forwarded += len(last)
            last = logits[:, -1].float().argmax(dim=-1).tolist()
            drop(record(range(len(last)), last))
