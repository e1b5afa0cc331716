"""What bench_search.py measures besides time: a device's peak matmul FLOP/s,
the FLOPs a search needs from the model's shapes, and peak memory over a block."""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass

import torch

from csr.engine.search.expansion import ExpandStats


def peak_matmul_flops(device: str, dtype: torch.dtype, seconds: float = 1.0) -> float:
    """The best FLOP/s of a square matmul on this device and dtype, measured now."""
    n = 4096 if device.startswith("cuda") else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = 0.0
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        sync(device)
        t0 = time.perf_counter()
        for _ in range(4):
            torch.matmul(a, b)
        sync(device)
        best = max(best, 4 * 2 * n**3 / (time.perf_counter() - t0))
    return best


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _exact_cpu_rss() -> None:
    """Make the resident set track live tensors: glibc keeps freed blocks for
    reuse and raises its mmap threshold as large blocks come and go, so a
    variant run after another would reuse memory and show no growth. A fixed
    threshold puts every tensor over 128 KiB in its own mapping, returned
    to the system when freed."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_mmap_threshold = -3
    libc.mallopt(m_mmap_threshold, 128 * 1024)
    libc.malloc_trim(0)


class PeakMemory:
    """Peak memory over a block: CUDA allocator peak above the start, or on
    CPU the resident set's growth above the start, sampled every 2 ms."""

    def __init__(self, device: str):
        self.device, self.peak = device, 0

    def _rss(self) -> int:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self):
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        else:
            _exact_cpu_rss()
            self.start = self._rss()
            self.stop = threading.Event()
            self.sampler = threading.Thread(target=self._sample, daemon=True)
            self.sampler.start()
        return self

    def _sample(self) -> None:
        while not self.stop.wait(0.002):
            self.peak = max(self.peak, self._rss() - self.start)

    def __exit__(self, *exc) -> None:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.start
        else:
            self.stop.set()
            self.sampler.join()
            self.peak = max(self.peak, self._rss() - self.start)


@dataclass(frozen=True)
class TextShape:
    """The language model's shapes, read from the text config of any family."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int

    @classmethod
    def of(cls, model) -> TextShape:
        text = model.config.get_text_config()
        heads = text.num_attention_heads
        return cls(
            hidden=text.hidden_size, layers=text.num_hidden_layers, heads=heads,
            kv_heads=getattr(text, "num_key_value_heads", None) or heads,
            head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads,
            intermediate=text.intermediate_size, vocab=text.vocab_size,
        )

    @property
    def linear_flops_per_token(self) -> int:
        """2 x the decoder's matmul weights a token meets: q, k, v, o and a
        gated MLP (gate, up, down), as every family's decoder has them."""
        q_o = 2 * self.hidden * self.heads * self.head_dim
        k_v = 2 * self.hidden * self.kv_heads * self.head_dim
        mlp = 3 * self.hidden * self.intermediate
        return 2 * self.layers * (q_o + k_v + mlp)

    @property
    def attention_flops_per_key(self) -> int:
        """Scores and the weighted sum of values: 4 x heads x head dim per key attended, per layer."""
        return 4 * self.heads * self.head_dim * self.layers

    @property
    def head_flops(self) -> int:
        return 2 * self.hidden * self.vocab


def image_flops(policy, image, prompt: str) -> float:
    """FLOPs of everything one prompt's forward pass runs outside the
    language model and its head (vision encoder, projector, merger), counted
    by torch's FlopCounterMode: the adapter names the language model, so no
    family's module names are needed here."""
    from torch.utils.flop_counter import FlopCounterMode

    from csr.engine.models.attention import attention_implementation
    from csr.engine.train.lora import _find_module

    model = policy.model
    language_model = _find_module(model, policy.adapter.language_model_names)
    head = next(n for n, m in model.named_modules() if m is model.get_output_embeddings())
    configs = list({id(c): c for m in model.modules() if (c := getattr(m, "config", None)) is not None}.values())
    # Eager attention is matmuls, which the counter counts; a fused kernel may not be.
    with attention_implementation(configs, "eager"), FlopCounterMode(display=False) as counter, \
            torch.inference_mode():
        model(**policy.encode(image, prompt), logits_to_keep=1)
    counts = {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}
    top = type(model).__name__
    return counts["Global"] - counts[f"{top}.{language_model}"] - counts[f"{top}.{head}"]


def useful_flops(model, prefix_lengths: list[int], image: float, stats: ExpandStats) -> float:
    """FLOPs the search needs (the sum of `useful_flops_parts`)."""
    return sum(useful_flops_parts(model, prefix_lengths, image, stats).values())


def useful_flops_parts(model, prefix_lengths: list[int], image: float, stats: ExpandStats) -> dict[str, float]:
    """FLOPs the search needs, from the text config's shapes (TextShape) and
    the tokens it ran, by part: the decoder's matmuls per searched token, the
    attention per key attended, the head per row of next-token logits; per
    prompt the prefix's prefill (causal) and its head row; `image`
    (image_flops, summed over the prompts) for the vision side. Padding,
    recomputed prefixes and copies are not useful work and are not counted.
    A sliding-window layer is counted as if it attended every key (an upper
    bound on its work)."""
    shape = TextShape.of(model)
    prefill = sum(shape.linear_flops_per_token * length + shape.attention_flops_per_key * length * (length + 1) / 2
                  + shape.head_flops for length in prefix_lengths)
    return {
        "vision": image,
        "prefill": prefill,
        "search linears": shape.linear_flops_per_token * stats.tokens,
        "search attention": shape.attention_flops_per_key * stats.attended,
        "search head": shape.head_flops * stats.logit_rows,
    }
