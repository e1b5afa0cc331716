"""`csr generate --iter N`: one worker in this process, or K worker processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from csr.cli.context import state
from csr.engine.errors import CsrError
from csr.engine.generation import WorkerOptions, iteration_config, run_worker
from csr.storage import work
from csr.storage.store import open_store

console = Console(stderr=True)
DTYPES = ("float32", "bfloat16", "float16")


def generate(
    ctx: typer.Context,
    iteration: int = typer.Option(..., "--iter", help="Iteration to generate (needs model version N-1)."),
    preset: str = typer.Option(None, "--preset", help="Reward preset: paper | reference-code (default: csr.toml or paper)."),
    lam: float = typer.Option(None, "--lambda", help="Weight of R_I in R(s) (default 0.9)."),
    select_by: str = typer.Option(None, "--select-by", help="Rank the next active set by 'reward' (paper) or 'text' (released code)."),
    device: str = typer.Option("cpu", "--device", help="torch device of this worker, e.g. cpu or cuda:0."),
    devices: str = typer.Option(None, "--devices", help="With --workers: one device per worker, comma-separated (cuda:0,cuda:1)."),
    workers: int = typer.Option(1, "--workers", min=1, help="Number of worker processes."),
    batch_prompts: int = typer.Option(4, "--batch-prompts", min=1, help="Prompts claimed per lease."),
    limit: int = typer.Option(None, "--limit", min=1, help="Stop after this many prompts (in total over the workers)."),
    lease_seconds: float = typer.Option(120.0, "--lease-seconds", min=1.0, help="How long a claim survives without a heartbeat."),
    max_attempts: int = typer.Option(3, "--max-attempts", min=1, help="Attempts before a prompt is marked failed."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
    dtype: str = typer.Option(None, "--dtype", help="Policy dtype for the search: float32 | bfloat16 | float16 (recorded with the iteration; default float32 on CPU, the checkpoint's on GPU)."),
    kv_budget: float = typer.Option(None, "--kv-budget", min=0.0, help="GiB of KV cache a batch of prompts may hold (default: half the device's free memory)."),
) -> None:
    """Run the calibrated sentence-level beam search over every prompt; resumable, many workers may share a store."""
    st = state(ctx)
    settings = dict(st.settings.generate)
    for key, value in (("preset", preset), ("lam", lam), ("select_by", select_by)):
        if value is not None:
            settings[key] = value
    device_list = _devices(devices, workers, device)
    engine = open_store(st.url)
    try:
        preset_name, config = iteration_config(engine, iteration, settings)
        if dtype is not None:
            if dtype not in DTYPES:
                raise CsrError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
            config["dtype"] = dtype
        _, created = work.start_iteration(engine, iteration, preset_name, config)
        if created and not quiet:
            console.print(f"iteration {iteration} started (preset {preset_name}, policy version {iteration - 1})")
        options = WorkerOptions(
            device=device_list[0],
            batch_prompts=batch_prompts,
            limit=limit,
            lease_seconds=lease_seconds,
            max_attempts=max_attempts,
            dtype=dtype,
            kv_budget=None if kv_budget is None else int(kv_budget * 2**30),
        )
        if workers == 1:
            _run_here(engine, iteration, config, options, quiet)
        else:
            _run_processes(ctx, engine, iteration, settings, options, device_list, quiet)
    finally:
        engine.dispose()


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


def _run_here(engine, iteration: int, config: dict, options: WorkerOptions, quiet: bool) -> None:
    stop = threading.Event()
    interrupts = 0

    def on_sigint(signum, frame):
        nonlocal interrupts
        interrupts += 1
        if interrupts == 1:
            console.print("stopping after the current prompt (Ctrl-C again to abandon it)")
            stop.set()
        else:
            raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, on_sigint)
    with engine.connect().execution_options(sqlite_begin="DEFERRED") as conn:
        counts = work.progress(conn, iteration)
    total = sum(counts.values())
    started = time.perf_counter()
    done = {"prompts": 0, "candidates": 0}
    try:
        with _progress(quiet) as bar:
            task = bar.add_task("generate", total=total, completed=counts[work.DONE] + counts[work.FAILED],
                                iteration=iteration, rates="")

            def on_progress(prompts: int, candidates: int) -> None:
                done["prompts"] += prompts
                done["candidates"] += candidates
                elapsed = max(time.perf_counter() - started, 1e-9)
                bar.update(task, advance=prompts, rates=f"{done['prompts'] / elapsed:.2f} prompts/s "
                                                        f"{done['candidates'] / elapsed:.1f} candidates/s")

            stats = run_worker(engine, iteration, config, options, stop=stop, on_progress=on_progress)
    finally:
        signal.signal(signal.SIGINT, previous)
    for error in stats.errors:
        console.print(f"failed: {error}")
    if not quiet:
        console.print(
            f"worker done: {stats.prompts_done} prompt(s), {stats.candidates} candidate(s), "
            f"{stats.prompts_failed} failed, in {stats.wall_seconds:.1f} s "
            f"(store writes {stats.store_seconds:.2f} s)"
        )


def _run_processes(ctx, engine, iteration, settings, options: WorkerOptions, device_list, quiet) -> None:
    st = state(ctx)
    exe = Path(sys.executable).with_name("csr")
    base = [str(exe) if exe.exists() else "csr", "--db", st.url]
    if st.config is not None:
        base += ["--config", str(st.config)]
    per_worker_limit = None
    if options.limit is not None:
        per_worker_limit = -(-options.limit // len(device_list))
    children = []
    threads = max(1, (os.cpu_count() or 1) // len(device_list))
    for device in device_list:
        cmd = base + [
            "generate", "--iter", str(iteration), "--device", device,
            "--batch-prompts", str(options.batch_prompts), "--lease-seconds", str(options.lease_seconds),
            "--max-attempts", str(options.max_attempts), "--quiet",
        ]
        for key, flag in (("preset", "--preset"), ("lam", "--lambda"), ("select_by", "--select-by")):
            if key in settings:
                cmd += [flag, str(settings[key])]
        if per_worker_limit is not None:
            cmd += ["--limit", str(per_worker_limit)]
        if options.dtype is not None:
            cmd += ["--dtype", options.dtype]
        if options.kv_budget is not None:
            cmd += ["--kv-budget", str(options.kv_budget / 2**30)]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "CSR_TORCH_THREADS": str(threads)}
        children.append(subprocess.Popen(cmd, env=env))
    started = time.perf_counter()
    try:
        with engine.connect().execution_options(sqlite_begin="DEFERRED") as conn:
            first = work.progress(conn, iteration)
        with _progress(quiet) as bar:
            task = bar.add_task("generate", total=sum(first.values()), completed=first[work.DONE] + first[work.FAILED],
                                iteration=iteration, rates="")
            while any(child.poll() is None for child in children):
                time.sleep(1.0)
                with engine.connect().execution_options(sqlite_begin="DEFERRED") as conn:
                    now = work.progress(conn, iteration)
                finished = now[work.DONE] + now[work.FAILED]
                elapsed = max(time.perf_counter() - started, 1e-9)
                rate = (now[work.DONE] - first[work.DONE]) / elapsed
                bar.update(task, completed=finished, rates=f"{rate:.2f} prompts/s, {len(children)} workers")
    except KeyboardInterrupt:
        # Children got the same SIGINT from the terminal and finish their current prompt.
        for child in children:
            child.wait()
        raise
    failed = [c.returncode for c in children if c.returncode != 0]
    if failed:
        raise CsrError(f"{len(failed)} of {len(children)} worker process(es) failed (exit codes {failed})")
    work.finish_iteration_if_done(engine, iteration)


def register(app: typer.Typer) -> None:
    app.command("generate")(generate)
