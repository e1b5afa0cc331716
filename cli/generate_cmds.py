"""`csr generate --iter N`: one worker in this process, or K worker processes.

Exit status: 0 when the iteration is finished (or --limit reached); 1 with one
line on an error; 130 / 143 when SIGINT / SIGTERM stopped the run (the
prompts in hand are released at once; a second signal aborts on the spot).
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from pathlib import Path

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from csr.cli.context import state
from csr.cli.output import Console, echo_json, json_option
from csr.cli.vocabulary import (
    DEVICE_HELP,
    DType,
    Preset,
    SelectBy,
    default_device,
    dtype_name,
    value,
)
from csr.engine import self_reward
from csr.engine.errors import CsrError
from csr.engine.generation import WorkerOptions, iteration_config, run_worker
from csr.engine.self_reward import Method
from csr.engine.workers import StopSignals, WorkerProcesses, worker_commands
from csr.storage import work
from csr.storage.outages import is_outage
from csr.storage.store import Store

console = Console(stderr=True)


def generate(
    ctx: typer.Context,
    iteration: int = typer.Option(..., "--iter", help="Iteration to generate (needs model version N-1)."),
    method: Method = typer.Option(None, "--method", help="How the iteration makes pairs: csr (the calibrated search) or self-reward (sampled responses judged with the paper's table 3 prompt, [self_reward] in csr.toml); default: the iteration's own, csr for a new one."),
    preset: Preset = typer.Option(None, "--preset", help="Reward preset (default: csr.toml or paper; docs/presets.md)."),
    lam: float = typer.Option(None, "--lambda", help="Weight of R_I in R(s) (default 0.9)."),
    select_by: SelectBy = typer.Option(None, "--select-by", help="Rank the next active set by the path's calibrated reward (paper), the sentence's own R(s), or the LM score (released code); default: the preset's."),
    device: str = typer.Option(None, "--device", help=DEVICE_HELP),
    devices: str = typer.Option(None, "--devices", help="With --workers: one device per worker, comma-separated (cuda:0,cuda:1)."),
    workers: int = typer.Option(1, "--workers", min=1, help="Number of worker processes."),
    batch_prompts: int = typer.Option(4, "--batch-prompts", min=1, help="Prompts claimed per lease."),
    limit: int = typer.Option(None, "--limit", min=1, help="Stop after this many prompts (in total over the workers)."),
    lease_seconds: float = typer.Option(120.0, "--lease-seconds", min=1.0, help="How long a claim survives without a heartbeat."),
    max_attempts: int = typer.Option(3, "--max-attempts", min=1, help="Attempts before a prompt is marked failed."),
    no_wait: bool = typer.Option(False, "--no-wait", help="When other workers still hold prompts, say so and exit 1 instead of waiting to take them over."),
    retry_failed: bool = typer.Option(False, "--retry-failed", help="Put the iteration's failed prompts back to pending first."),
    store_retry_seconds: float = typer.Option(300.0, "--store-retry-seconds", min=0.0, help="How long to retry a lost store connection before giving up."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
    dtype: DType = typer.Option(None, "--dtype", help="Policy dtype for the search (recorded with the iteration; default float32 on CPU, the checkpoint's on GPU)."),
    kv_budget: float = typer.Option(None, "--kv-budget", min=0.0, help="GiB of KV cache a batch of prompts may hold (default: half the device's free memory)."),
    as_json: bool = json_option("The iteration's progress when the run ends"),
) -> None:
    """Run the calibrated sentence-level beam search over every prompt; resumable, many workers may share a store."""
    st = state(ctx)
    settings = dict(st.settings.generate)
    dtype = dtype_name(dtype)
    flags = {"--preset": value(preset), "--lambda": lam, "--select-by": value(select_by)}
    for key, chosen in zip(("preset", "lam", "select_by"), flags.values(), strict=True):
        if chosen is not None:
            settings[key] = chosen
    device_list = _devices(devices, workers, default_device(device))
    with Store.open(st.url) as store:
        preset_name, config = _iteration_config(store, st, iteration, value(method), settings,
                                                 [flag for flag, chosen in flags.items() if chosen is not None])
        if dtype is not None:
            config["dtype"] = dtype
        _, created = store.start_iteration(iteration, preset_name, config)
        if created and not quiet:
            console.print(f"iteration {iteration} started (preset {preset_name}, policy version {iteration - 1})")
        if retry_failed:
            again = store.retry_failed(iteration)
            console.print(f"{again} failed prompt(s) of iteration {iteration} put back to pending")
        options = WorkerOptions(
            device=device_list[0],
            batch_prompts=batch_prompts,
            limit=limit,
            lease_seconds=lease_seconds,
            max_attempts=max_attempts,
            wait=not no_wait,
            store_retry_seconds=store_retry_seconds,
            dtype=dtype,
            kv_budget=None if kv_budget is None else int(kv_budget * 2**30),
        )
        if workers == 1:
            stats = _run_here(store, iteration, config, options, quiet)
        else:
            stats = _run_processes(ctx, store, iteration, settings, options, device_list, quiet)
        if as_json:
            echo_json({"iteration": iteration, "preset": preset_name, "prompts": store.progress(iteration),
                       "this_run": stats})


def _iteration_config(store: Store, st, iteration: int, method: str | None, settings: dict,
                      search_flags: list[str]) -> tuple[str, dict]:
    """The iteration's frozen settings under its method: an iteration started
    with a method keeps it, so a rerun without --method resumes it."""
    if method is None:
        existing = store.iteration(iteration)
        method = existing.method if existing is not None else Method.csr.value
    if method == Method.self_reward:
        if search_flags:
            raise CsrError(f"{search_flags[0]} sets the search of the csr method; "
                           f"iteration {iteration} is self-rewarding ([self_reward] in csr.toml)")
        return self_reward.iteration_config(store, iteration, st.settings.self_reward,
                                            f"[self_reward] in {st.settings.path}")
    return iteration_config(store, iteration, settings, f"[generate] in {st.settings.path}")


def _devices(devices: str | None, workers: int, device: str) -> list[str]:
    if devices is None:
        return [device] * workers
    names = [d.strip() for d in devices.split(",") if d.strip()]
    if len(names) != workers:
        raise CsrError(f"--devices names {len(names)} device(s) but --workers is {workers}")
    return names


def _progress(quiet: bool) -> Progress:
    return Progress(
        TextColumn("[bold]iteration {task.fields[iteration]}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rates]}"),
        TimeElapsedColumn(),
        console=console,
        disable=quiet,
    )


def _exit_if_stopped(signals: StopSignals, what: str) -> None:
    if signals.received is not None:
        name = signal.Signals(signals.received).name
        print(f"csr: stopped by {name}: {what}", file=sys.stderr, flush=True)
        raise typer.Exit(128 + signals.received)


def _run_here(store: Store, iteration: int, config: dict, options: WorkerOptions, quiet: bool) -> dict:
    stop = threading.Event()
    counts = store.progress(iteration)
    total = sum(counts.values())
    started = time.perf_counter()
    done = {"prompts": 0, "candidates": 0}
    with StopSignals(stop) as signals:
        with _progress(quiet) as bar:
            task = bar.add_task("generate", total=total, completed=counts[work.DONE] + counts[work.FAILED],
                                iteration=iteration, rates="")

            def on_progress(prompts: int, candidates: int) -> None:
                done["prompts"] += prompts
                done["candidates"] += candidates
                elapsed = max(time.perf_counter() - started, 1e-9)
                bar.update(task, advance=prompts, rates=f"{done['prompts'] / elapsed:.2f} prompts/s "
                                                        f"{done['candidates'] / elapsed:.1f} candidates/s")

            stats = run_worker(store, iteration, config, options, stop=stop, on_progress=on_progress,
                               say=lambda line: console.print(line, soft_wrap=True, highlight=False))
    for error in stats.errors:
        console.print(f"failed: {error}", soft_wrap=True, highlight=False, markup=False)
    _exit_if_stopped(
        signals,
        f"{stats.prompts_done} prompt(s) done, {stats.released} released for the next run; worker stopped"
    )
    if not quiet:
        console.print(
            f"worker done: {stats.prompts_done} prompt(s), {stats.candidates} candidate(s), "
            f"{stats.prompts_failed} failed, in {stats.wall_seconds:.1f} s "
            f"(store writes {stats.store_seconds:.2f} s)"
        )
    return {"prompts_done": stats.prompts_done, "candidates": stats.candidates, "prompts_failed": stats.prompts_failed,
            "wall_seconds": round(stats.wall_seconds, 3), "workers": 1}


def _run_processes(ctx, store: Store, iteration, settings, options: WorkerOptions, device_list, quiet) -> dict:
    st = state(ctx)
    exe = Path(sys.executable).with_name("csr")
    csr = [str(exe) if exe.exists() else "csr", "--db", st.url]
    if st.config is not None:
        csr += ["--config", str(st.config)]
    processes = WorkerProcesses(worker_commands(csr, iteration, settings, options, device_list))
    stop = threading.Event()
    started = time.perf_counter()
    with StopSignals(stop, on_signal=processes.forward) as signals:
        first = store.progress(iteration)
        with _progress(quiet) as bar:
            task = bar.add_task("generate", total=sum(first.values()), completed=first[work.DONE] + first[work.FAILED],
                                iteration=iteration, rates="")
            while processes.running():
                time.sleep(1.0)  # a signal runs its handler and the sleep goes on
                try:
                    now = store.progress(iteration)
                except Exception as exc:
                    if not is_outage(exc):
                        raise
                    continue  # a store outage: the workers retry on their own; so does the bar
                finished = now[work.DONE] + now[work.FAILED]
                elapsed = max(time.perf_counter() - started, 1e-9)
                rate = (now[work.DONE] - first[work.DONE]) / elapsed
                bar.update(task, completed=finished, rates=f"{rate:.2f} prompts/s, {len(processes.children)} workers")
    _exit_if_stopped(signals, f"{len(processes.children)} worker process(es) stopped; their prompts were released")
    failed = processes.failed()
    if failed:
        raise CsrError(f"{len(failed)} of {len(processes.children)} worker process(es) failed (exit codes {failed}); "
                       f"run `csr generate --iter {iteration}` again to finish the iteration")
    store.finish_iteration_if_done(iteration)
    done = store.progress(iteration)[work.DONE] - first[work.DONE]
    return {"prompts_done": done, "wall_seconds": round(time.perf_counter() - started, 3),
            "workers": len(processes.children)}


def register(app: typer.Typer) -> None:
    app.command("generate")(generate)
