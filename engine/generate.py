"""The generate step: what `csr generate`, `csr iterate` and `csr demo` run.

`generate_iteration` freezes the iteration's settings under its method (a new
iteration takes the one asked for; a started one keeps its own), starts or
resumes the iteration, puts failed prompts back when asked, then runs one
worker in this process or one worker process per device. Worker processes
start from a written spec (engine/worker_processes.py): the frozen settings and
the worker options as JSON, never a rebuilt command line. Stop signals reach
every worker: the first stops them after the prompts in hand, the second
aborts on the spot.
"""

from __future__ import annotations

import json
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from csr.engine.errors import CsrError
from csr.engine.worker_loop import WorkerOptions, iteration_config, run_worker
from csr.engine.worker_processes import StopSignals, WorkerProcesses
from csr.storage import DONE, FAILED, Store, StoreUnavailable

CSR_METHOD = "csr"
SELF_REWARD = "self-reward"


@dataclass(frozen=True)
class GenerateRequest:
    """One generate step, as the user asked for it."""

    iteration: int
    # None: the iteration's own method (csr for a new iteration).
    method: str | None = None
    # [generate] with the command's overrides; [self_reward] for that method.
    search_settings: dict = field(default_factory=dict)
    self_reward_settings: dict = field(default_factory=dict)
    # The search options the command set (--preset, ...): a self-rewarding iteration has no search.
    search_overrides: Sequence[str] = ()
    settings_source: str = "csr.toml"
    retry_failed: bool = False
    # One worker per device; one device: the worker runs in this process.
    devices: Sequence[str] = ("cpu",)
    options: WorkerOptions = field(default_factory=WorkerOptions)


@dataclass
class GenerateOutcome:
    iteration: int
    preset: str
    started: bool  # this step started the iteration
    retried: int  # failed prompts put back to pending
    workers: int
    prompts_done: int
    candidates: int | None  # None: counted by the worker processes, not here
    prompts_failed: int | None
    wall_seconds: float
    errors: list[str]
    released: int  # prompts given back unfinished by a stopped worker
    stopped_by: int | None  # the signal that stopped the step, if one did


def generate_iteration(
    store: Store,
    url: str,
    request: GenerateRequest,
    on_started: Callable[[str, bool, int], None] = lambda preset, started, retried: None,
    on_progress: Callable[[int, int, str], None] = lambda completed, total, rates: None,
    say: Callable[[str], None] = lambda line: None,
) -> GenerateOutcome:
    """Generates iteration `request.iteration` of the store at `url` (the URL
    worker processes open). `on_started(preset, started, retried)` runs once
    the iteration is started; `on_progress(completed, total, rates)` as prompts
    finish; `say` gets one-line notices (waiting for other workers, outages)."""
    iteration = request.iteration
    preset, config = frozen_config(store, request)
    if request.options.dtype is not None:
        config["dtype"] = request.options.dtype
    _, started = store.start_iteration(iteration, preset, config)
    retried = store.retry_failed(iteration) if request.retry_failed else 0
    on_started(preset, started, retried)
    run = _run_here if len(request.devices) == 1 else _run_processes
    outcome = run(store, url, iteration, config, request, on_progress, say)
    outcome.preset, outcome.started, outcome.retried = preset, started, retried
    return outcome


def frozen_config(store: Store, request: GenerateRequest) -> tuple[str, dict]:
    """The iteration's settings under its method: an iteration started with a
    method keeps it, so a rerun without one resumes it."""
    from csr.engine import self_reward

    iteration, method = request.iteration, request.method
    if method is None:
        existing = store.iteration(iteration)
        method = existing.method if existing is not None else CSR_METHOD
    if method == SELF_REWARD:
        if request.search_overrides:
            raise CsrError(f"{request.search_overrides[0]} sets the search of the csr method; "
                           f"iteration {iteration} is self-rewarding ([self_reward] in {request.settings_source})")
        return self_reward.iteration_config(store, iteration, request.self_reward_settings,
                                            f"[self_reward] in {request.settings_source}")
    return iteration_config(store, iteration, request.search_settings, f"[generate] in {request.settings_source}")


def _run_here(store, url, iteration, config, request: GenerateRequest, on_progress, say) -> GenerateOutcome:
    stop = threading.Event()
    counts = store.progress(iteration)
    total, completed = sum(counts.values()), counts[DONE] + counts[FAILED]
    started = time.perf_counter()
    done = {"prompts": 0, "candidates": 0}

    def progress(prompts: int, candidates: int) -> None:
        done["prompts"] += prompts
        done["candidates"] += candidates
        elapsed = max(time.perf_counter() - started, 1e-9)
        on_progress(completed + done["prompts"], total, f"{done['prompts'] / elapsed:.2f} prompts/s "
                                                        f"{done['candidates'] / elapsed:.1f} candidates/s")

    options = WorkerOptions(**{**asdict(request.options), "device": request.devices[0]})
    on_progress(completed, total, "")
    with StopSignals(stop) as signals:
        stats = run_worker(store, iteration, config, options, stop=stop, on_progress=progress, say=say)
    return GenerateOutcome(iteration, "", False, 0, 1, stats.prompts_done, stats.candidates, stats.prompts_failed,
                           stats.wall_seconds, list(stats.errors), stats.released, signals.received)


def _run_processes(store, url, iteration, config, request: GenerateRequest, on_progress, say) -> GenerateOutcome:
    with tempfile.TemporaryDirectory(prefix="csr-workers-") as directory:
        commands = [[sys.executable, "-m", "csr.engine.worker_processes", str(spec)]
                    for spec in write_worker_specs(Path(directory), url, iteration, config, request)]
        processes = WorkerProcesses(commands)
        stop = threading.Event()
        started = time.perf_counter()
        with StopSignals(stop, on_signal=processes.forward) as signals:
            first = store.progress(iteration)
            total = sum(first.values())
            on_progress(first[DONE] + first[FAILED], total, "")
            while processes.running():
                time.sleep(1.0)  # a signal runs its handler and the sleep goes on
                try:
                    now = store.progress(iteration)
                except StoreUnavailable:
                    continue  # a store outage: the workers retry on their own; so does the progress
                rate = (now[DONE] - first[DONE]) / max(time.perf_counter() - started, 1e-9)
                on_progress(now[DONE] + now[FAILED], total,
                            f"{rate:.2f} prompts/s, {len(processes.children)} workers")
    workers = len(processes.children)
    if signals.received is None:
        failed = processes.failed()
        if failed:
            raise CsrError(f"{len(failed)} of {workers} worker process(es) failed (exit codes {failed}); "
                           f"run `csr generate --iter {iteration}` again to finish the iteration")
        store.finish_iteration_if_done(iteration)
    done = store.progress(iteration)[DONE] - first[DONE]
    return GenerateOutcome(iteration, "", False, 0, workers, done, None, None, time.perf_counter() - started, [], 0,
                           signals.received)


def write_worker_specs(directory: Path, url: str, iteration: int, config: dict,
                       request: GenerateRequest) -> list[Path]:
    """One spec file per device: the store, the iteration's frozen settings and
    the worker's options (`--limit` shared out between the workers)."""
    devices = list(request.devices)
    limit = request.options.limit
    share = None if limit is None else -(-limit // len(devices))
    specs = []
    for n, device in enumerate(devices):
        options = {**asdict(request.options), "device": device, "limit": share}
        path = directory / f"worker-{n}.json"
        path.write_text(json.dumps({"url": url, "iteration": iteration, "config": config, "options": options}))
        specs.append(path)
    return specs
