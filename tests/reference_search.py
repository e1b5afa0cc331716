"""The sentence-level search computed the way the authors' released code pays
for it: each partial response expanded on its own with the prefix recomputed,
the image re-encoded by CLIP for every sentence and each sentence scored alone.

Test-only: the reference the batched search is tested against, and the
re-implemented baseline bench/bench_search.py runs beside the release itself
(bench/release_search.py). Call by call it computes what the release's
`generate` per node computes (CallCounts; docs/performance.md), and the bench
checks the two agree on candidates/s.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from csr.engine.search.beam_search import BeamSettings, TokenBeam, group_beam_search
from csr.engine.search.config import SearchConfig
from csr.engine.search.expansion import ExpandStats
from csr.engine.search.kv_cache import CachedRows, buffer_cache, is_plain_cache
from csr.engine.search.records import CandidateRecord, SearchResult
from csr.engine.search.sentence_search import run_sentence_search, search_beam_settings


@dataclass
class CallCounts:
    """What the released-code-style search computes, in the terms
    bench/release_search.py counts the release in: one `generate`-like call
    per partial (a prefill), forward passes, positions prefilled (image
    features included, every beam row), rows decoded one token at a time,
    images through the vision tower; and CLIP image encodes."""

    generate_calls: int = 0
    forward_passes: int = 0
    prefill_positions: int = 0
    decode_rows: int = 0
    vision_images: int = 0
    clip_image_encodes: int = 0


def naive_expand(
    policy,
    image,
    user_prompt: str,
    partials: Sequence[Sequence[int]],
    caps: Sequence[int],
    settings: BeamSettings,
    stats: ExpandStats | None = None,
    template: str = "chat",
    counts: CallCounts | None = None,
) -> list[list[TokenBeam]]:
    """`expand_partials` the way the authors' released code pays for it: one
    `generate` call per partial response, each re-running the vision tower and
    the whole prefix (prompt + response so far), on `num_beams` copies of the
    input as transformers' beam search expands it before the first forward.
    The token-level search itself is the same, so results are the same."""
    model = policy.model
    out: list[list[TokenBeam]] = []
    for part, cap in zip(partials, caps, strict=True):
        inputs = policy.encode(image, user_prompt, template)
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
        if is_plain_cache(cache):  # the same cache implementation as the batched search
            cache = buffer_cache([(k, v) for k, v, *_ in cache], length + cap)
        rows = CachedRows(
            model,
            cache,
            batch["attention_mask"],
            torch.full((n,), length, dtype=torch.long, device=ids.device),
        )
        out.extend(group_beam_search(first.logits[:1, -1].float(), rows.step, [cap], settings))
        if stats is not None:
            stats.forward_passes += rows.forward_passes + 1
            stats.rows_forwarded += rows.rows_forwarded + n * length
        if counts is not None:
            counts.generate_calls += 1
            counts.forward_passes += rows.forward_passes + 1
            counts.prefill_positions += n * length
            counts.decode_rows += rows.rows_forwarded
            counts.vision_images += n
    return out


def naive_sentence_beam_search(
    policy, clip, image, prompt_text: str, config: SearchConfig, counts: CallCounts | None = None
) -> SearchResult:
    """The same sentence-level search, computed as the released code does:
    each partial response expanded on its own with the prefix recomputed
    (`naive_expand`), the image re-encoded by CLIP for every sentence and
    each sentence scored alone. The baseline of bench/bench_search.py and
    the reference the batched search is tested against."""
    settings = search_beam_settings(policy, config)
    expand_stats = ExpandStats()

    def expand(partials: list[list[int]], caps: list[int]) -> list[list[TokenBeam]]:
        return naive_expand(policy, image, prompt_text, partials, caps, settings, expand_stats,
                            config.prompt_template, counts)

    def score(texts: list[str]) -> list[float]:
        if counts is not None:
            counts.clip_image_encodes += len(texts)
        return [clip.raw_scores(clip.encode_image(image), [text])[0] for text in texts]

    result = run_sentence_search(policy, config, expand, score, prompt_text)
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
