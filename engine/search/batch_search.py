"""The sentence-level search of several prompts at once, one forward pass for all.

Each prompt's tree is a generator (`sentence_search_steps`) that yields the
partials it wants expanded at its next depth and is sent back their
candidates, then yields the sentences CLIP must score and is sent back
their scores. One loop steps every prompt of a claim: it collects the
requests of the prompts in flight, runs them as one token-level search
(`expand_prompts`: the rows of every prompt advance in the same forward
passes, each against its own shared prefix), sends each prompt its share,
then scores every prompt's new sentences in one CLIP text batch. A prompt
that finishes leaves at once and its place goes to the next prompt of the
claim (continuous batching). No threads: the tree logic (rewards,
selection, records) is the single-prompt code, only the model and CLIP
calls are pooled, so results are those of `sentence_beam_search` prompt by
prompt.

How many prompts are in flight follows a KV-cache budget in bytes
(`kv_bytes_per_prompt` of each prompt against the budget), by default a
share of the device's free memory.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from csr.engine.search.cascade_attention import kv_bytes_per_token, text_shapes
from csr.engine.search.config import SearchConfig
from csr.engine.search.expansion import ExpandStats, PromptPrefix, expand_prompts
from csr.engine.search.records import SearchResult
from csr.engine.search.sentence_search import (
    ExpandRequest,
    ScoreRequest,
    SearchSteps,
    search_beam_settings,
    sentence_search_steps,
)

# Of the free memory, the share the search's KV cache may take by default:
# the rest is for weights' activations, logits (rows x vocabulary) and the allocator's slack.
DEFAULT_BUDGET_SHARE = 0.5


@dataclass(frozen=True)
class PromptJob:
    image: object
    prompt_text: str
    image_embedding: torch.Tensor | None = None


def default_kv_budget(device: str) -> int:
    """Bytes the KV cache may use: a share of the device's free memory now."""
    if str(device).startswith("cuda") and torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info(torch.device(device))
    else:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return int(free * DEFAULT_BUDGET_SHARE)


def kv_bytes_per_prompt(model, config: SearchConfig, prefix_length: int, shared: bool = True) -> int:
    """The most KV bytes one prompt's search can hold: at most num_beams
    active partial responses (the capacity of a search layer) x
    num_token_beams rows, each with room for the longest response plus one
    sentence; the prefix once (shared) or in every row."""
    layers, kv_heads, head_dim = text_shapes(model)
    per_token = kv_bytes_per_token(layers, kv_heads, head_dim, torch.finfo(model.dtype).bits // 8)
    rows = config.num_beams * config.num_token_beams
    suffix = config.max_length + config.max_new_tokens
    if shared:
        return per_token * (prefix_length + rows * suffix)
    return per_token * rows * (prefix_length + suffix)


def search_prompts(
    policy,
    clip,
    jobs: Sequence[PromptJob],
    config: SearchConfig,
    kv_budget: int | None = None,
    attention: str = "cascade",
    stats: ExpandStats | None = None,
) -> list[SearchResult | BaseException]:
    """`sentence_beam_search` for each job, the prompts in flight expanded
    together. Returns per job its SearchResult, or the exception its search
    raised (one bad prompt does not stop the others). `kv_budget` (bytes)
    bounds the prompts in flight; None: from the device's free memory.
    `stats`, if given, collects the token-level counters of every pass."""
    settings = search_beam_settings(policy, config)
    stats = stats if stats is not None else ExpandStats()
    budget = default_kv_budget(policy.device) if kv_budget is None else kv_budget
    out: list[SearchResult | BaseException | None] = [None] * len(jobs)
    queue = _Queue(policy, jobs, config)
    flight: dict[int, _InFlight] = {}
    while queue or flight:
        _admit(policy, clip, jobs, config, budget, attention, queue, flight, out)
        if flight:
            _step(flight, clip, settings, stats, attention, out)
    return out


@dataclass
class _InFlight:
    """One prompt being searched: its prefix, its image's CLIP embedding, its
    tree and what the tree asks next."""

    prefix: PromptPrefix
    embedding: torch.Tensor
    steps: SearchSteps
    request: ExpandRequest | ScoreRequest
    kv_bytes: int
    alone: bool  # the per-row path, or a model the shared prefix does not apply to
    passes: int = 0
    rows: int = 0


class _Queue:
    """The prompts not yet started, in claim order. The first one's prefix is
    run when it is first looked at and held until it is admitted: its
    length decides whether it fits, and running it twice would cost a
    vision-tower pass."""

    def __init__(self, policy, jobs: Sequence[PromptJob], config: SearchConfig):
        self.policy = policy
        self.config = config
        self.jobs = jobs
        self.next = 0
        self.prefix: PromptPrefix | BaseException | None = None

    def __bool__(self) -> bool:
        return self.next < len(self.jobs)

    def peek(self) -> tuple[int, PromptPrefix | BaseException]:
        if self.prefix is None:
            self.prefix = _prefix_or_error(self.policy, self.jobs[self.next], self.config)
        return self.next, self.prefix

    def pop(self) -> None:
        self.next += 1
        self.prefix = None


def _admit(policy, clip, jobs, config, budget, attention, queue: _Queue, flight, out) -> None:
    """Starts waiting prompts, in claim order, while they fit the budget
    beside those in flight. A prompt that must run alone waits for an empty
    batch and then holds it; one prompt always runs, whatever its size."""
    while queue and not any(f.alone for f in flight.values()):
        i, prefix = queue.peek()
        if isinstance(prefix, BaseException):
            out[i] = prefix
            queue.pop()
            continue
        alone = attention != "cascade" or not prefix.shares_prefix
        kv_bytes = kv_bytes_per_prompt(policy.model, config, prefix.length)
        used = sum(f.kv_bytes for f in flight.values())
        if flight and (alone or used + kv_bytes > budget):
            return
        queue.pop()
        job = jobs[i]
        try:
            embedding = job.image_embedding if job.image_embedding is not None else clip.encode_image(job.image)
            steps = sentence_search_steps(policy, config, job.prompt_text)
            flight[i] = _InFlight(prefix, embedding, steps, next(steps), kv_bytes, alone)
        except Exception as exc:
            out[i] = exc


def _step(flight: dict[int, _InFlight], clip, settings, stats: ExpandStats, attention: str, out) -> None:
    """One depth of every prompt in flight: their expansions in one
    token-level search, then their sentences scored in one CLIP batch."""
    order = sorted(flight)
    before = (stats.forward_passes, stats.rows_forwarded)
    try:
        found = expand_prompts(
            [(flight[i].prefix, *flight[i].request) for i in order], settings, stats=stats, attention=attention
        )
    except Exception as exc:
        _fail(flight, order, exc, out)
        return
    for i, beams in zip(order, found, strict=True):
        # Each pooled pass serves every prompt in it: each is charged the whole count.
        flight[i].passes += stats.forward_passes - before[0]
        flight[i].rows += stats.rows_forwarded - before[1]
        _send(flight, i, beams, out)
    scoring = [i for i in sorted(flight) if isinstance(flight[i].request, ScoreRequest)]
    if not scoring:
        return
    try:
        texts = [text for i in scoring for text in flight[i].request.texts]
        embeddings = clip.encode_texts(texts)
    except Exception as exc:
        _fail(flight, scoring, exc, out)
        return
    start = 0
    for i in scoring:
        count = len(flight[i].request.texts)
        image = flight[i].embedding.to(embeddings.device).float()
        _send(flight, i, (100.0 * (embeddings[start : start + count] @ image)).tolist(), out)
        start += count


def _send(flight: dict[int, _InFlight], i: int, reply, out) -> None:
    """Gives prompt i's tree what it asked for; a tree that ends leaves the flight."""
    prompt = flight[i]
    try:
        prompt.request = prompt.steps.send(reply)
    except StopIteration as done:
        result: SearchResult = done.value
        result.stats.forward_passes = prompt.passes + prompt.prefix.forward_passes
        result.stats.rows_forwarded = prompt.rows + prompt.prefix.length
        out[i] = result
        del flight[i]
    except Exception as exc:
        out[i] = exc
        del flight[i]


def _fail(flight: dict[int, _InFlight], which: list[int], exc: Exception, out) -> None:
    for i in which:
        flight.pop(i).steps.close()
        out[i] = exc


def _prefix_or_error(policy, job: PromptJob, config: SearchConfig) -> PromptPrefix | BaseException:
    try:
        return PromptPrefix(policy, job.image, job.prompt_text, config.prompt_template)
    except Exception as exc:
        return exc
