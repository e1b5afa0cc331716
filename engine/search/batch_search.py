"""The sentence-level search of several prompts at once, one forward pass for all.

`run_sentence_search` drives one prompt's tree and asks for one depth's
expansions at a time. Here each prompt's driver runs unchanged in a thread
of its own; their `expand` calls meet at a rendezvous, and when every
prompt still searching has asked, the expansions of all of them run as one
token-level search (`expand_prompts`): the rows of every prompt advance in
the same forward passes, each against its own shared prefix. The tree logic
(rewards, selection, records) is not duplicated and cannot drift from the
single-prompt path; only the model calls are pooled. The threads never run
model code concurrently (the pooled search runs while the others wait), so
results are those of `sentence_beam_search` prompt by prompt.

How many prompts share a batch follows a KV-cache budget in bytes
(`prompts_for_budget`), by default a share of the device's free memory.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from csr.engine.search.cascade_attention import kv_bytes_per_token, text_shapes
from csr.engine.search.sentence_search import (
    ExpandStats,
    PromptPrefix,
    SearchConfig,
    SearchResult,
    TokenBeam,
    expand_prompts,
    run_sentence_search,
    search_beam_settings,
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


def prompts_for_budget(model, config: SearchConfig, prefix_length: int, budget: int) -> int:
    """How many prompts one batch can hold within `budget` bytes of KV cache (at least one)."""
    return max(1, budget // kv_bytes_per_prompt(model, config, prefix_length))


class _Rendezvous:
    """Pools the `expand` calls of several prompt drivers into one call of `run`.

    A batch runs when every driver still searching is waiting; a driver
    that ends (or fails) leaves, and the others no longer wait for it."""

    def __init__(self, drivers: int, run):
        self.run = run
        self.live = drivers
        self.waiting: dict[int, tuple[list[list[int]], list[int]]] = {}
        self.results: dict[int, list[list[TokenBeam]]] = {}
        self.error: BaseException | None = None
        self.cond = threading.Condition()

    def expand(self, driver: int, partials: list[list[int]], caps: list[int]) -> list[list[TokenBeam]]:
        with self.cond:
            self.waiting[driver] = (partials, caps)
            self._run_if_all_waiting()
            while driver not in self.results and self.error is None:
                self.cond.wait()
            if driver not in self.results:
                raise RuntimeError("the pooled expansion failed in another prompt's driver") from self.error
            return self.results.pop(driver)

    def leave(self) -> None:
        with self.cond:
            self.live -= 1
            self._run_if_all_waiting()

    def _run_if_all_waiting(self) -> None:
        # Runs under the lock: every other live driver is waiting for it anyway.
        if not self.waiting or len(self.waiting) < self.live or self.error is not None:
            return
        batch, self.waiting = self.waiting, {}
        try:
            self.results.update(self.run(batch))
        except BaseException as exc:
            self.error = exc
            raise
        finally:
            self.cond.notify_all()


def search_prompts(
    policy,
    clip,
    jobs: Sequence[PromptJob],
    config: SearchConfig,
    kv_budget: int | None = None,
    attention: str = "cascade",
    stats: ExpandStats | None = None,
) -> list[SearchResult | BaseException]:
    """`sentence_beam_search` for each job, the prompts of a batch expanded
    together. Returns per job its SearchResult, or the exception its search
    raised (one bad prompt does not stop the others). `kv_budget` (bytes)
    sizes the batches; None: from the device's free memory. `stats`, if
    given, collects the token-level counters of every batch."""
    settings = search_beam_settings(policy, config)
    stats = stats if stats is not None else ExpandStats()
    budget = default_kv_budget(policy.device) if kv_budget is None else kv_budget
    out: list[SearchResult | BaseException] = []
    start = 0
    while start < len(jobs):
        first = _prefix_or_error(policy, jobs[start], config)
        length = first.length if isinstance(first, PromptPrefix) else 0
        pooled = attention == "cascade" and isinstance(first, PromptPrefix) and first.shares_prefix
        # The per-row path (or a model the shared prefix does not apply to) holds one prompt a batch.
        size = prompts_for_budget(policy.model, config, length, budget) if pooled else 1
        batch = jobs[start : start + size]
        prefixes = [first] + [_prefix_or_error(policy, job, config) for job in batch[1:]]
        out.extend(_search_batch(policy, clip, batch, prefixes, config, settings, attention, stats))
        start += len(batch)
    return out


def _prefix_or_error(policy, job: PromptJob, config: SearchConfig) -> PromptPrefix | BaseException:
    try:
        return PromptPrefix(policy, job.image, job.prompt_text, config.prompt_template)
    except Exception as exc:
        return exc


def _search_batch(policy, clip, jobs, prefixes, config, settings, attention, stats) -> list:
    ready = [i for i, p in enumerate(prefixes) if isinstance(p, PromptPrefix)]
    out: list[SearchResult | BaseException] = list(prefixes)  # errors stay in place
    # Each pooled pass serves every prompt in it: each is charged the whole count.
    passes = dict.fromkeys(ready, 0)
    rows = dict.fromkeys(ready, 0)

    def run(batch: dict[int, tuple[list[list[int]], list[int]]]) -> dict[int, list[list[TokenBeam]]]:
        order = sorted(batch)
        before = (stats.forward_passes, stats.rows_forwarded)
        found = expand_prompts(
            [(prefixes[i], *batch[i]) for i in order], settings, stats=stats, attention=attention
        )
        for i in order:
            passes[i] += stats.forward_passes - before[0]
            rows[i] += stats.rows_forwarded - before[1]
        return dict(zip(order, found, strict=True))

    rendezvous = _Rendezvous(len(ready), run)

    def drive(i: int) -> None:
        job, prefix = jobs[i], prefixes[i]
        try:
            embedding = job.image_embedding
            if embedding is None:
                embedding = clip.encode_image(job.image)

            def score(texts: list[str]) -> list[float]:
                return clip.raw_scores(embedding, texts)

            def expand(partials: list[list[int]], caps: list[int]) -> list[list[TokenBeam]]:
                return rendezvous.expand(i, partials, caps)

            result = run_sentence_search(policy, config, expand, score, job.prompt_text)
            result.stats.forward_passes = passes[i] + prefix.forward_passes
            result.stats.rows_forwarded = rows[i] + prefix.length
            out[i] = result
        except Exception as exc:
            out[i] = exc
        finally:
            rendezvous.leave()

    if len(ready) == 1:
        drive(ready[0])
        return out
    threads = [threading.Thread(target=drive, args=(i,), name=f"csr-search-{i}") for i in ready]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return out
