"""Switching the attention implementation a model's decoder layers use.

The search's cascade attention and the prefix-shared DPO forward each
register an attention function with transformers and run the model under it
for a while; both set the name on the decoder configs and restore it after.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any


@contextmanager
def attention_implementation(configs: Sequence[Any], name: str) -> Iterator[None]:
    """`configs` attend with the registered implementation `name` inside the block."""
    saved = [c._attn_implementation_internal for c in configs]
    for c in configs:
        c._attn_implementation_internal = name
    try:
        yield
    finally:
        for c, old in zip(configs, saved, strict=True):
            c._attn_implementation_internal = old
