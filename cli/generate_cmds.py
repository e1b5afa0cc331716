"""`csr generate --iter N`: one worker in this process, or K worker processes
(the generate step itself is engine/generate.py; this module parses and shows).

Exit status: 0 when the iteration is finished (or --limit reached); 1 with one
line on an error; 130 / 143 when SIGINT / SIGTERM stopped the run (the
prompts in hand are released at once; a second signal aborts on the spot).
"""

from __future__ import annotations

import signal
import sys
from dataclasses import asdict

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from csr.cli.context import CliState, state
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
from csr.engine.errors import CsrError
from csr.engine.generate import GenerateRequest, generate_iteration
from csr.engine.self_reward import Method
from csr.engine.worker_loop import WorkerOptions
from csr.storage import Store

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
    request = generate_request(
        st, iteration, method=method, preset=preset, lam=lam, select_by=select_by, device=device, devices=devices,
        workers=workers, batch_prompts=batch_prompts, limit=limit, lease_seconds=lease_seconds,
        max_attempts=max_attempts, no_wait=no_wait, retry_failed=retry_failed,
        store_retry_seconds=store_retry_seconds, dtype=dtype, kv_budget=kv_budget,
    )
    run_generate(st, request, quiet, as_json)


def generate_request(st: CliState, iteration: int, *, method=None, preset=None, lam=None, select_by=None,
                     device=None, devices=None, workers=1, batch_prompts=4, limit=None, lease_seconds=120.0,
                     max_attempts=3, no_wait=False, retry_failed=False, store_retry_seconds=300.0, dtype=None,
                     kv_budget=None) -> GenerateRequest:
    """The generate step the options ask for (`csr generate` and `csr iterate` alike)."""
    settings = dict(st.settings.generate)
    flags = {"--preset": value(preset), "--lambda": lam, "--select-by": value(select_by)}
    for key, chosen in zip(("preset", "lam", "select_by"), flags.values(), strict=True):
        if chosen is not None:
            settings[key] = chosen
    dtype = dtype_name(dtype)
    device_list = _devices(devices, workers, default_device(device))
    return GenerateRequest(
        iteration=iteration,
        method=value(method),
        search_settings=settings,
        self_reward_settings=dict(st.settings.self_reward),
        search_overrides=tuple(flag for flag, chosen in flags.items() if chosen is not None),
        settings_source=str(st.settings.path),
        retry_failed=retry_failed,
        devices=tuple(device_list),
        options=WorkerOptions(
            device=device_list[0],
            batch_prompts=batch_prompts,
            limit=limit,
            lease_seconds=lease_seconds,
            max_attempts=max_attempts,
            wait=not no_wait,
            store_retry_seconds=store_retry_seconds,
            dtype=dtype,
            kv_budget=None if kv_budget is None else int(kv_budget * 2**30),
        ),
    )


def run_generate(st: CliState, request: GenerateRequest, quiet: bool, as_json: bool = False) -> None:
    """One generate step with a progress bar and its messages; exits 128 + the
    signal when one stopped it."""
    iteration = request.iteration

    def started(preset: str, created: bool, retried: int) -> None:
        if created and not quiet:
            console.print(f"iteration {iteration} started (preset {preset}, policy version {iteration - 1})")
        if request.retry_failed:
            console.print(f"{retried} failed prompt(s) of iteration {iteration} put back to pending")

    with Store.open(st.url) as store, _progress(quiet) as bar:
        task = bar.add_task("generate", total=None, iteration=iteration, rates="")

        def progress(completed: int, total: int, rates: str) -> None:
            bar.update(task, completed=completed, total=total, rates=rates)

        outcome = generate_iteration(store, st.url, request, on_started=started, on_progress=progress,
                                     say=lambda line: console.print(line, soft_wrap=True, highlight=False))
        prompts = store.progress(iteration)
    for error in outcome.errors:
        console.print(f"failed: {error}", soft_wrap=True, highlight=False, markup=False)
    if outcome.stopped_by is not None:
        name = signal.Signals(outcome.stopped_by).name
        if outcome.workers == 1:
            what = (f"{outcome.prompts_done} prompt(s) done, {outcome.released} released for the next run; "
                    "worker stopped")
        else:
            what = f"{outcome.workers} worker process(es) stopped; their prompts were released"
        print(f"csr: stopped by {name}: {what}", file=sys.stderr, flush=True)
        raise typer.Exit(128 + outcome.stopped_by)
    if not quiet and outcome.workers == 1:
        console.print(f"worker done: {outcome.prompts_done} prompt(s), {outcome.candidates} candidate(s), "
                      f"{outcome.prompts_failed} failed, in {outcome.wall_seconds:.1f} s")
    if as_json:
        this_run = {k: v for k, v in asdict(outcome).items() if k in (
            "prompts_done", "candidates", "prompts_failed", "workers")}
        this_run["wall_seconds"] = round(outcome.wall_seconds, 3)
        echo_json({"iteration": iteration, "preset": outcome.preset, "prompts": prompts, "this_run": this_run})


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


def register(app: typer.Typer) -> None:
    app.command("generate")(generate)
