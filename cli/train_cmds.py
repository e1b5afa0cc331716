"""curate, train, export, lineage, iterate."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console

from csr.cli.context import state
from csr.cli.vocabulary import (
    DEVICE_HELP,
    DType,
    ExportFormat,
    PairRule,
    Preset,
    ReportTo,
    SelectBy,
    deprecated,
    hidden_option,
    iteration_range,
    value,
)
from csr.engine import iterations
from csr.engine.errors import CsrError
from csr.engine.pipeline import run_iteration
from csr.storage.store import Store

console = Console()


def curate(
    ctx: typer.Context,
    iteration: int = typer.Option(..., "--iter", help="Iteration whose candidates to curate."),
    preset: Preset = typer.Option(None, "--preset", help="Reward preset (default: the iteration's)."),
    lam: float = typer.Option(None, "--lambda", help="Weight of R_I (default: the iteration's; on a tree grown under another lambda this re-curates, it does not regenerate)."),
    min_margin: float = typer.Option(0.0, "--min-margin", help="Drop pairs whose reward margin is below this."),
    pair_set: str = typer.Option(None, "--pair-set", help="Name of the pair set to create (default derived from the parameters)."),
    make_default: bool = typer.Option(False, "--default", help="Make this the pair set `csr train` uses."),
    pair_rule: PairRule = typer.Option(None, "--pair-rule", help="distinct (best and worst score, the rejected text differs; paper's default) or depth-first (the release's first best and last worst in depth-first order, equal texts allowed; reference-code's default)."),
    name: str = hidden_option(None, "--name"),
) -> None:
    """Select chosen/rejected pairs by SQL over the stored responses into a named pair set."""
    if name is not None:
        deprecated("--name", "--pair-set")
        pair_set = pair_set or name
    with Store.open(state(ctx).url) as store:
        result = iterations.curate(store, iteration, value(preset), lam, min_margin, pair_set, make_default, value(pair_rule))
    _say_curated(result)


def _say_curated(result) -> None:
    verb = "created" if result.created else "unchanged"
    default = " (default)" if result.is_default else ""
    console.print(f"pair set {result.name!r}{default} {verb}: {result.pairs} pair(s), hash {result.result_hash[:16]}")
    if result.note:
        console.print(result.note)


def train(
    ctx: typer.Context,
    iteration: int = typer.Option(..., "--iter", help="Train model version N from N-1 on iteration N's pairs."),
    allow_partial: bool = typer.Option(False, "--allow-partial", help="Train although some prompts are not generated yet."),
    force: bool = typer.Option(False, "--force", help="Replace an existing model version N."),
    pair_set: str = typer.Option(None, "--pair-set", help="Pair set name (default: the iteration's default set)."),
    device: str = typer.Option(None, "--device", help=DEVICE_HELP + " Under `accelerate launch` leave it unset: accelerate places each process."),
    report_to: ReportTo = typer.Option(None, "--report-to", help="Where TRL reports training logs besides the store (default: [train] report_to, none)."),
) -> None:
    """DPO with LoRA from model version N-1 (policy and reference); merge and register version N."""
    st = state(ctx)
    settings = st.settings
    if report_to is not None:
        settings.train = {**settings.train, "report_to": report_to.value}
    with Store.open(st.url) as store:
        outcome = iterations.train(
            store, settings, iteration,
            iterations.TrainOptions(allow_partial=allow_partial, force=force, pair_set=pair_set, device=device),
        )
    _say_trained(outcome)


def _say_trained(outcome: iterations.TrainOutcome) -> None:
    resumed = f", resumed from step {outcome.resumed_from_step}" if outcome.resumed_from_step else ""
    loss = outcome.final_metrics.get("loss")
    console.print(
        f"model version {outcome.version} saved to {outcome.path} (weights {outcome.weights_hash[:16]}) "
        f"from {outcome.pairs} pair(s) in {outcome.train_seconds:.1f} s{resumed}"
        + (f"; final loss {loss:.4f}" if loss is not None else "")
    )
    console.print(f"reference log-probs: {outcome.reference}")
    if outcome.skipped_too_long:
        console.print(
            f"{outcome.skipped_too_long} pair(s) left out: a response is longer than max_response_tokens "
            "(never cut; raise [train] max_response_tokens, or set too_long = \"refuse\")"
        )


def export(
    ctx: typer.Context,
    iteration: int = typer.Option(..., "--iter", help="Iteration whose pairs to export."),
    fmt: ExportFormat = typer.Option(ExportFormat.llava_json, "--format", help="The reference release's LLaVA JSON, TRL's preference JSONL, or Parquet with every score."),
    out: Path = typer.Option(None, "--out", help="Output file path (default derived from the iteration and pair set)."),
    pair_set: str = typer.Option(None, "--pair-set", help="Pair set name (default: the iteration's default set)."),
) -> None:
    """Write an iteration's pairs in the reference release's LLaVA format, TRL's preference columns, or Parquet."""
    from csr.engine.io.export import export_pairs

    with Store.open(state(ctx).url) as store:
        path, count = export_pairs(store, iteration, fmt.value, out, pair_set)
    console.print(f"wrote {count} pair(s) to {path}")


def lineage(
    ctx: typer.Context,
    version: int = typer.Option(None, "--version", help="Model version to trace."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output on stdout."),
    positional: int = typer.Argument(None, hidden=True, metavar=""),
) -> None:
    """The provenance chain of a model version back to the base model."""

    if positional is not None:
        deprecated("`csr lineage N`", "`csr lineage --version N`")
        version = positional if version is None else version
    if version is None:
        raise CsrError("name the model version: csr lineage --version N")
    with Store.open(state(ctx).url) as store, store.read() as tx:
        chain = tx.lineage(version)
    if not chain:
        raise CsrError(f"no model version {version} in the store")
    if as_json:
        typer.echo(json.dumps(chain, indent=2, default=str))
        return
    for entry in chain:
        console.print(f"[bold]model version {entry['version']}[/bold]  {entry['path']}  "
                      f"weights {(entry['weights_hash'] or 'base model, not hashed')[:16]}")
        if "training_run" in entry:
            run, ps, gen = entry["training_run"], entry["pair_set"], entry["generation"]
            console.print(f"  trained by run {run['id']} on pair set {ps['name']!r} of iteration {run['iteration']} "
                          f"(pairs hash {run['pairs_hash'][:16]}, pair-set hash {ps['result_hash'][:16]})")
            console.print(f"  pair selection: preset {ps['preset']}, params {ps['params']}")
            console.print(f"  training query: {' '.join(run['selection_sql'].split())}")
            console.print(f"  hyper-parameters: {run['hyperparams']}")
            console.print(f"  candidates generated by model version {gen['policy_version']} "
                          f"with preset {gen['preset']}, search {gen['config'].get('search')}")
        else:
            console.print(f"  base model {entry['base_model']}, CLIP {entry['clip']} {entry['clip_pretrained'] or ''}")


def iterate(
    ctx: typer.Context,
    iterations_: str = typer.Option(None, "--iter", help="Iterations to run: N or A-B, e.g. 1-3."),
    preset: Preset = typer.Option(None, "--preset", help="Reward preset (default: csr.toml or paper)."),
    lam: float = typer.Option(None, "--lambda", help="Weight of R_I in R(s) (default 0.9)."),
    select_by: SelectBy = typer.Option(None, "--select-by", help="Selection key of the search (default: the preset's)."),
    device: str = typer.Option(None, "--device", help=DEVICE_HELP),
    devices: str = typer.Option(None, "--devices", help="With --workers: one device per generation worker, comma-separated (cuda:0,cuda:1)."),
    workers: int = typer.Option(1, "--workers", min=1, help="Generation worker processes."),
    batch_prompts: int = typer.Option(4, "--batch-prompts", min=1, help="Prompts claimed per lease."),
    lease_seconds: float = typer.Option(120.0, "--lease-seconds", min=1.0, help="How long a claim survives without a heartbeat."),
    max_attempts: int = typer.Option(3, "--max-attempts", min=1, help="Attempts before a prompt is marked failed."),
    store_retry_seconds: float = typer.Option(300.0, "--store-retry-seconds", min=0.0, help="How long to retry a lost store connection before giving up."),
    dtype: DType = typer.Option(None, "--dtype", help="Policy dtype for the search (recorded with each iteration)."),
    kv_budget: float = typer.Option(None, "--kv-budget", min=0.0, help="GiB of KV cache a batch of prompts may hold."),
    min_margin: float = typer.Option(0.0, "--min-margin", help="Drop pairs whose reward margin is below this."),
    report_to: ReportTo = typer.Option(None, "--report-to", help="Where TRL reports training logs besides the store."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
    start: int = hidden_option(None, "--from"),
    end: int = hidden_option(None, "--to"),
) -> None:
    """generate -> curate -> train for each iteration, with the options of each step; resumable at any step."""
    from csr.cli.generate_cmds import generate

    st = state(ctx)
    if start is not None or end is not None:
        deprecated("--from/--to", "--iter A-B")
        if start is None or end is None:
            raise CsrError("--from and --to go together; use --iter A-B")
        iterations_ = iterations_ or f"{start}-{end}"
    if iterations_ is None:
        raise CsrError("name the iterations: csr iterate --iter 1-3")
    numbers = iteration_range(iterations_)  # a bad range is refused before the store is opened
    settings = st.settings
    if report_to is not None:
        settings.train = {**settings.train, "report_to": report_to.value}

    def generate_step(number: int) -> None:
        ctx.invoke(generate, ctx=ctx, iteration=number, preset=preset, lam=lam, select_by=select_by, device=device,
                   devices=devices, workers=workers, batch_prompts=batch_prompts, limit=None,
                   lease_seconds=lease_seconds, max_attempts=max_attempts, no_wait=False, retry_failed=False,
                   store_retry_seconds=store_retry_seconds, quiet=quiet, dtype=dtype, kv_budget=kv_budget)

    with Store.open(st.url) as store:
        for number in numbers:
            done = run_iteration(store, settings, number, generate_step,
                                 iterations.TrainOptions(device=device), min_margin=min_margin)
            if done.kept:
                console.print(f"iteration {number}: model version {number} exists, skipping")
                continue
            _say_curated(done.curated)
            _say_trained(done.trained)


def register(app: typer.Typer) -> None:
    app.command("curate")(curate)
    app.command("train")(train)
    app.command("export")(export)
    app.command("lineage")(lineage)
    app.command("iterate")(iterate)
