"""The generation worker: the one place where the search meets the store.

Loop: claim a batch of prompts with a lease, run the sentence-level beam
search on each, write each prompt's whole tree in the transaction that marks
it done. A heartbeat thread extends the leases; if the process dies, the
leases run out (or, on the same host, its dead pid is noticed) and other
workers take the prompts over.

Faults (docs/faults.md): a store outage is retried with backoff for a bounded
time (`Store.retrying`), the tree's transaction written again whole; a tree
the store refuses fails that prompt's attempt, not the run. When no work is left but other
workers hold leases, the worker waits for them and takes their prompts over
if their leases expire, so one run finishes the iteration.
"""

from __future__ import annotations

import hashlib
import io
import os
import threading
import time
import traceback
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta

from PIL import Image

from csr.engine.errors import CsrError, SettingsError
from csr.storage import (
    CANDIDATE_COLUMNS,
    FAILED,
    RESPONSE_COLUMNS,
    Claim,
    Holder,
    OutageRetry,
    Store,
    StoreRefused,
    StoreUnavailable,
    Tree,
    first_line,
    utcnow,
)


@dataclass(frozen=True)
class WorkerOptions:
    device: str = "cpu"
    batch_prompts: int = 4
    limit: int | None = None
    lease_seconds: float = 120.0
    max_attempts: int = 3
    # No work left but other workers hold leases: wait for them (and take their
    # prompts over when the leases expire), or return at once.
    wait: bool = True
    # How long a lost store connection is retried before the worker gives up.
    store_retry_seconds: float = 300.0
    dtype: str | None = None  # the policy's dtype for the search (None: float32 on CPU, the checkpoint's on GPU)
    kv_budget: int | None = None  # bytes of KV cache a batch of prompts may hold (None: from free memory)


class StoreLost(CsrError):
    """The store stayed unreachable for longer than --store-retry-seconds."""


class ImageChanged(CsrError):
    """A prompt's image file no longer has the content it had at import."""


class WorkStillHeld(CsrError):
    """--no-wait: the iteration is unfinished because other workers hold prompts."""


@dataclass
class WorkerStats:
    prompts_done: int = 0
    prompts_failed: int = 0
    prompts_lost: int = 0  # leases taken over by another worker before we finished
    candidates: int = 0
    search_seconds: float = 0.0
    store_seconds: float = 0.0
    wall_seconds: float = 0.0
    released: int = 0  # prompts given back unfinished when the worker was stopped
    store_retries: int = 0
    errors: list[str] = field(default_factory=list)


def iteration_config(store: Store, iteration: int, generate_settings: dict,
                     source: str = "[generate] settings") -> tuple[str, dict]:
    """The settings to freeze into the iteration: search parameters and the models used.
    `source` names where the settings came from, for the error a typo gets."""
    from csr.engine.search.sentence_search import SearchConfig

    try:
        search = SearchConfig.from_dict(generate_settings)
    except SettingsError as exc:
        raise CsrError(f"{source}: {exc}") from exc
    return search.preset, {"search": search.to_dict(), **models_config(store, iteration)}


def models_config(store: Store, iteration: int) -> dict:
    """The models an iteration freezes, whatever its method: the policy
    (version N-1) and the reward CLIP. Before an iteration starts, a model that
    cannot be found is refused: it must not leave a started iteration behind."""
    policy = store.model_version(iteration - 1)
    base = store.model_version(0)
    started = store.iteration(iteration) is not None
    if base is None:
        raise CsrError("the store has no base model: run `csr init`")
    if not started and policy is not None:
        from csr.engine.loading import check_clip, check_policy

        check_policy(policy.path)
        check_clip(base.clip_model, base.clip_pretrained)
    return {
        "policy_version": iteration - 1,
        "policy_path": policy.path if policy is not None else None,
        "clip": base.clip_model,
        "clip_pretrained": base.clip_pretrained,
    }


def debug() -> bool:
    """CSR_DEBUG=1: tracebacks and full database errors instead of one line."""
    return os.environ.get("CSR_DEBUG", "") not in ("", "0")


class _Heartbeat(threading.Thread):
    def __init__(self, store: Store, worker_id: int, lease: timedelta):
        super().__init__(daemon=True, name="csr-heartbeat")
        self.store, self.worker_id, self.lease = store, worker_id, lease
        self.stopped = threading.Event()

    def run(self) -> None:
        interval = max(self.lease.total_seconds() / 3, 0.5)
        while not self.stopped.wait(interval):
            try:
                self.store.heartbeat(self.worker_id, self.lease)
            except Exception:  # a missed beat is retried; the lease has slack for two
                continue


def _store_lost(exc: StoreUnavailable, bound: float) -> StoreLost:
    return StoreLost(
        f"the store was unreachable for {exc.seconds:.0f} s, longer than --store-retry-seconds {bound:g}: "
        f"{exc.detail}; this worker's leases will expire and a rerun takes its prompts over"
    )


def run_worker(
    store: Store,
    iteration: int,
    config: dict,
    options: WorkerOptions,
    stop: threading.Event | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    say: Callable[[str], None] | None = None,
) -> WorkerStats:
    """Generate until the iteration is finished, `limit` prompts are done, or `stop` is set.

    `say` receives one-line notices (waiting for other workers, store outages).
    """
    from csr.engine.loading import load_clip, load_policy

    stop = stop or threading.Event()
    say = say or (lambda _line: None)
    stats = WorkerStats()
    started = time.perf_counter()
    if config["policy_path"] is None:
        raise CsrError(f"iteration {iteration} has no policy model")
    _limit_threads()
    # An iteration started with a dtype keeps it: the trees depend on it.
    policy = load_policy(config["policy_path"], device=options.device, dtype=config.get("dtype", options.dtype))
    clip = load_clip(config["clip"], config["clip_pretrained"], device=options.device)
    search_config = _method_config(config)
    lease = timedelta(seconds=options.lease_seconds)
    retry = store.retrying(options.store_retry_seconds, say)
    try:
        worker_id = retry(store.register_worker, iteration, options.device)
    except StoreUnavailable as exc:
        raise _store_lost(exc, options.store_retry_seconds) from exc
    beat = _Heartbeat(store, worker_id, lease)
    beat.start()
    embeddings: OrderedDict[int, object] = OrderedDict()
    held: list[Claim] = []
    store_lost = False
    waiting_for: tuple | None = None
    try:
        while not stop.is_set():
            want = options.batch_prompts
            if options.limit is not None:
                want = min(want, options.limit - stats.prompts_done - stats.prompts_failed)
                if want <= 0:
                    break
            # Holding nothing here: a claim lost to a dropped connection goes back first.
            retry(store.release_unheld, worker_id)
            held = retry(store.claim, iteration, worker_id, want, lease, options.max_attempts)
            if not held:
                pending, others = retry(store.outstanding, iteration, worker_id)
                if pending:  # given back (or put back) since our claim looked: claim again
                    stop.wait(0.05)
                    continue
                if not others:
                    break  # nothing pending, nothing claimed: the iteration is finished
                described = _describe(others)
                if not options.wait:
                    raise WorkStillHeld(
                        f"iteration {iteration} is not finished: {described}; "
                        "run again without --no-wait to wait and take them over if their leases expire"
                    )
                shape = tuple((h.worker_id, h.prompts) for h in others)
                if shape != waiting_for:
                    # The usual end of a run shared by several workers, not a fault: a
                    # lease that runs out (its worker gone) is taken over here.
                    say(f"all prompts are claimed; waiting for the rest: {described}")
                    waiting_for = shape
                stop.wait(_until_next_look(others))
                continue
            waiting_for = None
            inputs = retry(store.prompt_inputs, [c.prompt_id for c in held])
            # The prompts of a claim are searched together (one forward pass
            # serves all their rows), then each tree is written on its own.
            t0 = time.perf_counter()
            outcomes = _search_claims(policy, clip, held, inputs, search_config, embeddings, options)
            share = (time.perf_counter() - t0) / max(len(held), 1)
            for outcome in outcomes:
                claim = held[0]
                if isinstance(outcome, BaseException):  # one bad prompt must not stop the run
                    held.pop(0)
                    if not isinstance(outcome, (OSError, CsrError, ValueError)) and debug():
                        traceback.print_exception(outcome)
                    _fail(retry, store, claim, worker_id, first_line(outcome), options, stats)
                    continue
                t1 = time.perf_counter()
                tree = outcome if isinstance(outcome, Tree) else tree_rows(outcome)
                try:
                    # One transaction: the whole tree, or (rolled back) nothing. After an
                    # outage it is written again whole; if the lost commit had landed, the
                    # item is no longer ours and nothing is written twice.
                    written = retry(store.write_tree, claim, worker_id, iteration, tree)
                except StoreRefused as exc:  # the store refused this tree: this prompt's failure
                    held.pop(0)
                    if debug():
                        traceback.print_exc()
                    _fail(retry, store, claim, worker_id, exc.detail, options, stats)
                    continue
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
    except StoreUnavailable as exc:
        store_lost = True
        raise _store_lost(exc, options.store_retry_seconds) from exc
    finally:
        beat.stopped.set()
        stats.released = len(held)
        if not store_lost:  # with the store gone, the leases simply expire
            _finish(retry, store, worker_id, iteration, held)
        stats.store_retries = retry.retries
        stats.wall_seconds = time.perf_counter() - started
    return stats


def _fail(retry: OutageRetry, store: Store, claim: Claim, worker_id: int, message: str, options: WorkerOptions,
          stats: WorkerStats) -> None:
    state = retry(store.fail, claim, worker_id, message, options.max_attempts)
    if state == FAILED:
        stats.prompts_failed += 1
        stats.errors.append(f"prompt {claim.prompt_id}: {message}")


def _finish(retry: OutageRetry, store: Store, worker_id: int, iteration: int, held: list[Claim]) -> None:
    """Give back what this worker still holds, record it as stopped, close the iteration if done."""
    try:
        retry(store.release, worker_id, held)
        retry(store.stop_worker, worker_id)
        retry(store.finish_iteration_if_done, iteration)
    except StoreUnavailable:
        pass  # the leases expire instead; a rerun finishes the iteration


def _describe(others: list[Holder], shown: int = 2) -> str:
    """One line, however many workers: the first few, then a count."""
    total = sum(h.prompts for h in others)
    parts = [h.describe() for h in others[:shown]]
    if len(others) > shown:
        parts.append(f"and {len(others) - shown} more worker(s)")
    return f"{total} prompt(s) held by other workers: " + "; ".join(parts)


def _until_next_look(others: list[Holder]) -> float:
    """Seconds to wait: until the first lease ends, but look now and then for dead workers."""
    first_end = min(h.lease_expires_at for h in others)
    seconds = (first_end - utcnow()).total_seconds() + 0.05
    return min(max(seconds, 0.05), 2.0)


def _method_config(config: dict):
    """How the iteration makes its trees: the search's settings, or (method
    self-reward, engine/self_reward.py) the sampling and judge settings."""
    if config.get("method") == "self-reward":
        from csr.engine.self_reward import SelfRewardConfig, SelfRewardRun

        return SelfRewardRun(SelfRewardConfig.from_dict(config["self_reward"]), config["policy_version"])
    from csr.engine.search.sentence_search import SearchConfig

    return SearchConfig.from_dict(config["search"])


def _search_claims(policy, clip, held, inputs, search_config, embeddings, options) -> list:
    """Per claim, its SearchResult (or, self-rewarding, its Tree) or the exception that stopped it."""
    from csr.engine.search.batch_search import PromptJob, search_prompts
    from csr.engine.self_reward import SelfRewardRun

    if isinstance(search_config, SelfRewardRun):
        return _sample_claims(policy, clip, held, inputs, search_config, embeddings)

    outcomes: list = [None] * len(held)
    jobs, where = [], []
    for i, claim in enumerate(held):
        text, image_path, image_id, image_sha256 = inputs[claim.prompt_id]
        try:
            image = _load_image(image_path, image_sha256)
            embedding = _cached(embeddings, image_id, lambda img=image: clip.encode_image(img))
        except Exception as exc:
            outcomes[i] = exc
            continue
        jobs.append(PromptJob(image, text, embedding))
        where.append(i)
    for i, result in zip(where, search_prompts(policy, clip, jobs, search_config, options.kv_budget), strict=True):
        outcomes[i] = result
    return outcomes


def _sample_claims(policy, clip, held, inputs, run, embeddings) -> list:
    """Self-rewarding: each claim's samples and judgements, one prompt at a time."""
    from csr.engine.self_reward import sample_and_judge

    outcomes: list = []
    for claim in held:
        text, image_path, image_id, image_sha256 = inputs[claim.prompt_id]
        try:
            image = _load_image(image_path, image_sha256)
            embedding = _cached(embeddings, image_id, lambda img=image: clip.encode_image(img))
            outcomes.append(sample_and_judge(policy, clip, image, embedding, text, claim.prompt_id, run.config,
                                             run.policy_version))
        except Exception as exc:
            outcomes.append(exc)
    return outcomes


def _load_image(path: str, sha256: str) -> Image.Image:
    """The prompt's image, if its bytes are still those imported: the tree must
    be searched on the image the store names, not on a file replaced since."""
    with open(path, "rb") as file:
        data = file.read()
    if hashlib.sha256(data).hexdigest() != sha256:
        raise ImageChanged(f"image changed since import: {path} (sha256 {sha256[:12]}... in the store)")
    with Image.open(io.BytesIO(data)) as image:
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
