"""`csr generate --iter N`: one worker in this process, or K worker processes.

Exit status: 0 when the iteration is finished (or --limit reached); 1 with one
line on an error; 130 / 143 when SIGINT / SIGTERM stopped the run (the
prompts in hand are released at once; a second signal aborts on the spot).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from sqlalchemy.exc import SQLAlchemyError

from csr.cli.context import state
from csr.cli.vocabulary import DEVICE_HELP, DType, Preset, SelectBy, default_device, value
from csr.engine.errors import CsrError
from csr.engine.generation import WorkerOptions, iteration_config, run_worker
from csr.storage import work
from csr.storage.store import open_store, reading

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)

console = Console(stderr=True)


def generate(
    ctx: typer.Context,
    iteration: int = typer.Option(..., "--iter", help="Iteration to generate (needs model version N-1)."),
    preset: Preset = typer.Option(None, "--preset", help="Reward preset (default: csr.toml or paper; README: Reward presets)."),
    lam: float = typer.Option(None, "--lambda", help="Weight of R_I in R(s) (default 0.9)."),
    select_by: SelectBy = typer.Option(None, "--select-by", help="Rank the next active set by the calibrated reward (paper) or the LM score (released code); default: the preset's."),
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
) -> None:
    """Run the calibrated sentence-level beam search over every prompt; resumable, many workers may share a store."""
    st = state(ctx)
    settings = dict(st.settings.generate)
    dtype = value(dtype)
    for key, chosen in (("preset", value(preset)), ("lam", lam), ("select_by", value(select_by))):
        if chosen is not None:
            settings[key] = chosen
    device_list = _devices(devices, workers, default_device(device))
    engine = open_store(st.url)
    try:
        preset_name, config = iteration_config(engine, iteration, settings, f"[generate] in {st.settings.path}")
        if dtype is not None:
            config["dtype"] = dtype
        _, created = work.start_iteration(engine, iteration, preset_name, config)
        if created and not quiet:
            console.print(f"iteration {iteration} started (preset {preset_name}, policy version {iteration - 1})")
        if retry_failed:
            again = work.retry_failed(engine, iteration)
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


class _StopSignals:
    """SIGINT / SIGTERM: the first stops the worker after the prompt in hand, the second aborts."""

    def __init__(self, stop: threading.Event, on_signal: Callable[[int], None] | None = None):
        # on_signal runs for every signal received (K worker processes: pass it on).
        self.stop, self.on_signal = stop, on_signal
        self.received: int | None = None
        self.previous: dict[int, object] = {}

    def __enter__(self) -> _StopSignals:
        for signum in STOP_SIGNALS:
            self.previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *_exc) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum: int, _frame) -> None:
        name = signal.Signals(signum).name
        if self.on_signal is not None:
            self.on_signal(signum)
        if self.received is not None:
            # Abort on the spot, store untouched: the leases expire (or, on this host,
            # the next worker sees this pid gone) as after SIGKILL.
            print(f"csr: aborted by a second {name}; the prompts in hand go back when their leases end",
                  file=sys.stderr, flush=True)
            os._exit(128 + signum)
        self.received = signum
        print(f"csr: {name}: stopping after the current prompt ({name} again to abort at once)",
              file=sys.stderr, flush=True)
        self.stop.set()

    def exit_if_stopped(self, what: str) -> None:
        if self.received is not None:
            name = signal.Signals(self.received).name
            print(f"csr: stopped by {name}: {what}", file=sys.stderr, flush=True)
            raise typer.Exit(128 + self.received)


def _run_here(engine, iteration: int, config: dict, options: WorkerOptions, quiet: bool) -> None:
    stop = threading.Event()
    with reading(engine) as conn:
        counts = work.progress(conn, iteration)
    total = sum(counts.values())
    started = time.perf_counter()
    done = {"prompts": 0, "candidates": 0}
    with _StopSignals(stop) as signals:
        with _progress(quiet) as bar:
            task = bar.add_task("generate", total=total, completed=counts[work.DONE] + counts[work.FAILED],
                                iteration=iteration, rates="")

            def on_progress(prompts: int, candidates: int) -> None:
                done["prompts"] += prompts
                done["candidates"] += candidates
                elapsed = max(time.perf_counter() - started, 1e-9)
                bar.update(task, advance=prompts, rates=f"{done['prompts'] / elapsed:.2f} prompts/s "
                                                        f"{done['candidates'] / elapsed:.1f} candidates/s")

            stats = run_worker(engine, iteration, config, options, stop=stop, on_progress=on_progress,
                               say=lambda line: console.print(line, soft_wrap=True, highlight=False))
    for error in stats.errors:
        console.print(f"failed: {error}", soft_wrap=True, highlight=False, markup=False)
    signals.exit_if_stopped(
        f"{stats.prompts_done} prompt(s) done, {stats.released} released for the next run; worker stopped"
    )
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
            "--store-retry-seconds", str(options.store_retry_seconds),
        ]
        if not options.wait:
            cmd.append("--no-wait")
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
        # Own session: a terminal's Ctrl-C reaches only this process, which passes
        # each signal on once (a second one then aborts the children too).
        children.append(subprocess.Popen(cmd, env=env, start_new_session=True))

    def forward(signum: int) -> None:
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    stop = threading.Event()
    started = time.perf_counter()
    with _StopSignals(stop, on_signal=forward) as signals:
        with reading(engine) as conn:
            first = work.progress(conn, iteration)
        with _progress(quiet) as bar:
            task = bar.add_task("generate", total=sum(first.values()), completed=first[work.DONE] + first[work.FAILED],
                                iteration=iteration, rates="")
            while any(child.poll() is None for child in children):
                time.sleep(1.0)  # a signal runs its handler and the sleep goes on
                try:
                    with reading(engine) as conn:
                        now = work.progress(conn, iteration)
                except SQLAlchemyError:
                    continue  # a store outage: the workers retry on their own; so does the bar
                finished = now[work.DONE] + now[work.FAILED]
                elapsed = max(time.perf_counter() - started, 1e-9)
                rate = (now[work.DONE] - first[work.DONE]) / elapsed
                bar.update(task, completed=finished, rates=f"{rate:.2f} prompts/s, {len(children)} workers")
    signals.exit_if_stopped(f"{len(children)} worker process(es) stopped; their prompts were released")
    failed = [c.returncode for c in children if c.returncode != 0]
    if failed:
        raise CsrError(f"{len(failed)} of {len(children)} worker process(es) failed (exit codes {failed}); "
                       f"run `csr generate --iter {iteration}` again to finish the iteration")
    work.finish_iteration_if_done(engine, iteration)


def register(app: typer.Typer) -> None:
    app.command("generate")(generate)
