"""What bench_search.py measures besides time: a device's peak matmul FLOP/s,
the FLOPs a search needs from the model's shapes, and peak memory over a block."""

from __future__ import annotations

import os
import threading
import time

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


def _linear_params(module) -> int:
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, torch.nn.Linear))


def useful_flops(model, prefix_lengths: list[int], image_tokens: int, stats: ExpandStats) -> float:
    """FLOPs the search needs, from the model's shapes and the tokens it ran:
    2 x (linear weights) per token, 4 x width per key attended per layer, the
    language-model head for each row's next-token logits, and per prompt the
    vision tower and the prefix's prefill (causal). Padding, recomputed
    prefixes and copies are not useful work and are not counted."""
    text = model.config.get_text_config()
    decoder = model.get_decoder()
    layers, width = text.num_hidden_layers, text.num_attention_heads * (
        getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    )
    per_token = 2 * _linear_params(decoder)
    head = 2 * model.get_output_embeddings().weight.numel()
    flops = per_token * stats.tokens + 4 * width * layers * stats.attended + head * stats.logit_rows
    vision = model.config.vision_config
    vision_tokens = image_tokens + 1
    vision_linear = 2 * (_linear_params(model.model.vision_tower) + _linear_params(model.model.multi_modal_projector))
    for length in prefix_lengths:
        flops += per_token * length + 4 * width * layers * length * (length + 1) / 2 + head
        flops += vision_linear * vision_tokens + 4 * vision.hidden_size * vision.num_hidden_layers * vision_tokens**2
    return flops
