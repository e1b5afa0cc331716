"""The generation worker: the one place where the search meets the store.

Loop: claim a batch of prompts with a lease, run the sentence-level beam
search on each, write each prompt's whole tree in the transaction that marks
it done. A heartbeat thread extends the leases; if the process dies, the
leases run out and other workers take the prompts over.
"""

from __future__ import annotations

import os
import threading
import time
import traceback
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta

from PIL import Image
from sqlalchemy import Engine

from csr.engine.errors import CsrError
from csr.storage import work
from csr.storage.store import model_version
from csr.storage.trees import CANDIDATE_COLUMNS, RESPONSE_COLUMNS, Tree

PRESETS = ("paper", "reference-code")


@dataclass(frozen=True)
class WorkerOptions:
    device: str = "cpu"
    batch_prompts: int = 4
    limit: int | None = None
    lease_seconds: float = 120.0
    max_attempts: int = 3
    dtype: str | None = None  # the policy's dtype for the search (None: float32 on CPU, the checkpoint's on GPU)
    kv_budget: int | None = None  # bytes of KV cache a batch of prompts may hold (None: from free memory)


@dataclass
class WorkerStats:
    prompts_done: int = 0
    prompts_failed: int = 0
    prompts_lost: int = 0  # leases taken over by another worker before we finished
    candidates: int = 0
    search_seconds: float = 0.0
    store_seconds: float = 0.0
    wall_seconds: float = 0.0
    errors: list[str] = field(default_factory=list)


def iteration_config(engine: Engine, iteration: int, generate_settings: dict) -> tuple[str, dict]:
    """The settings to freeze into the iteration: search parameters and the models used."""
    from csr.engine.search import SearchConfig

    try:
        search = SearchConfig.from_dict(generate_settings)
    except (TypeError, ValueError) as exc:
        raise CsrError(f"invalid [generate] settings: {exc}") from exc
    if search.preset not in PRESETS:
        raise CsrError(f"unknown preset {search.preset!r}; choose one of {', '.join(PRESETS)}")
    with engine.connect().execution_options(sqlite_begin="DEFERRED") as conn:
        policy = model_version(conn, iteration - 1)
        base = model_version(conn, 0)
    if base is None:
        raise CsrError("the store has no base model: run `csr init`")
    config = {
        "search": search.to_dict(),
        "policy_version": iteration - 1,
        "policy_path": policy.path if policy is not None else None,
        "clip": base.clip_model,
        "clip_pretrained": base.clip_pretrained,
    }
    return search.preset, config


class _Heartbeat(threading.Thread):
    def __init__(self, engine: Engine, worker_id: int, lease: timedelta):
        super().__init__(daemon=True, name="csr-heartbeat")
        self.engine, self.worker_id, self.lease = engine, worker_id, lease
        self.stopped = threading.Event()

    def run(self) -> None:
        interval = max(self.lease.total_seconds() / 3, 0.5)
        while not self.stopped.wait(interval):
            try:
                work.heartbeat(self.engine, self.worker_id, self.lease)
            except Exception:  # a missed beat is retried; the lease has slack for two
                continue


def run_worker(
    engine: Engine,
    iteration: int,
    config: dict,
    options: WorkerOptions,
    stop: threading.Event | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> WorkerStats:
    """Generate until no work is left, `limit` prompts are done, or `stop` is set."""
    from csr.engine.loading import load_clip, load_policy
    from csr.engine.search import SearchConfig

    stop = stop or threading.Event()
    stats = WorkerStats()
    started = time.perf_counter()
    if config["policy_path"] is None:
        raise CsrError(f"iteration {iteration} has no policy model")
    _limit_threads()
    # An iteration started with a dtype keeps it: the trees depend on it.
    policy = load_policy(config["policy_path"], device=options.device, dtype=config.get("dtype", options.dtype))
    clip = load_clip(config["clip"], config["clip_pretrained"], device=options.device)
    search_config = SearchConfig.from_dict(config["search"])
    lease = timedelta(seconds=options.lease_seconds)
    worker_id = work.register_worker(engine, iteration, options.device)
    beat = _Heartbeat(engine, worker_id, lease)
    beat.start()
    embeddings: OrderedDict[int, object] = OrderedDict()
    held: list[work.Claim] = []
    try:
        while not stop.is_set():
            want = options.batch_prompts
            if options.limit is not None:
                want = min(want, options.limit - stats.prompts_done - stats.prompts_failed)
                if want <= 0:
                    break
            held = work.claim(engine, iteration, worker_id, want, lease, options.max_attempts)
            if not held:
                break
            with engine.connect().execution_options(sqlite_begin="DEFERRED") as conn:
                inputs = work.prompt_inputs(conn, [c.prompt_id for c in held])
            # The prompts of a claim are searched together (one forward pass
            # serves all their rows), then each tree is written on its own.
            t0 = time.perf_counter()
            outcomes = _search_claims(policy, clip, held, inputs, search_config, embeddings, options)
            share = (time.perf_counter() - t0) / max(len(held), 1)
            for outcome in outcomes:
                claim = held[0]
                if isinstance(outcome, BaseException):  # one bad prompt must not stop the run
                    held.pop(0)
                    message = f"{type(outcome).__name__}: {outcome}"
                    state = work.fail(engine, claim, worker_id, message, options.max_attempts)
                    if state == work.FAILED:
                        stats.prompts_failed += 1
                        stats.errors.append(f"prompt {claim.prompt_id}: {message}")
                    if not isinstance(outcome, (OSError, CsrError, ValueError)):
                        traceback.print_exception(outcome)
                    continue
                t1 = time.perf_counter()
                tree = tree_rows(outcome)
                written = work.complete(engine, claim, worker_id, iteration, tree)
                t2 = time.perf_counter()
                held.pop(0)
                stats.search_seconds += share
                stats.store_seconds += t2 - t1
                if written:
                    stats.prompts_done += 1
                    stats.candidates += len(tree.candidates)
                    if on_progress:
                        on_progress(1, len(tree.candidates))
                else:
                    stats.prompts_lost += 1
    finally:
        beat.stopped.set()
        work.release(engine, worker_id, held)
        work.stop_worker(engine, worker_id)
        work.finish_iteration_if_done(engine, iteration)
        stats.wall_seconds = time.perf_counter() - started
    return stats


def _search_claims(policy, clip, held, inputs, search_config, embeddings, options) -> list:
    """Per claim, its SearchResult or the exception that stopped it."""
    from csr.engine.batch_search import PromptJob, search_prompts

    outcomes: list = [None] * len(held)
    jobs, where = [], []
    for i, claim in enumerate(held):
        text, image_path, image_id = inputs[claim.prompt_id]
        try:
            image = _load_image(image_path)
            embedding = _cached(embeddings, image_id, lambda img=image: clip.encode_image(img))
        except Exception as exc:
            outcomes[i] = exc
            continue
        jobs.append(PromptJob(image, text, embedding))
        where.append(i)
    for i, result in zip(where, search_prompts(policy, clip, jobs, search_config, options.kv_budget), strict=True):
        outcomes[i] = result
    return outcomes


def _load_image(path: str) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")


def _cached(cache: OrderedDict, key, compute, size: int = 256):
    if key in cache:
        cache.move_to_end(key)
        return cache[key]
    value = compute()
    cache[key] = value
    if len(cache) > size:
        cache.popitem(last=False)
    return value


def tree_rows(result) -> Tree:
    """A SearchResult as the store's rows."""
    candidates = [{c: getattr(r, c) for c in CANDIDATE_COLUMNS} for r in result.records]
    responses = [
        {c: getattr(r, c) for c in RESPONSE_COLUMNS} for r in result.responses
    ]
    return Tree(candidates, responses)


def _limit_threads() -> None:
    # K CPU workers on one machine share its cores instead of oversubscribing them.
    threads = os.environ.get("CSR_TORCH_THREADS")
    if threads:
        import torch

        torch.set_num_threads(int(threads))
