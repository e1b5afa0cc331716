"""curate, train, export, lineage, iterate."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console

from csr.cli.context import state
from csr.engine import iterations
from csr.engine.errors import CsrError
from csr.storage.store import model_version, open_store

console = Console()


def curate(
    ctx: typer.Context,
    iteration: int = typer.Option(..., "--iter", help="Iteration whose candidates to curate."),
    preset: str = typer.Option(None, "--preset", help="paper | reference-code (default: the iteration's)."),
    lam: float = typer.Option(None, "--lambda", help="Weight of R_I (default: the iteration's; 0 and 1 are the paper's ablations)."),
    min_margin: float = typer.Option(0.0, "--min-margin", help="Drop pairs whose reward margin is below this."),
    name: str = typer.Option(None, "--name", help="Pair set name (default derived from the parameters)."),
    make_default: bool = typer.Option(False, "--default", help="Make this the pair set `csr train` uses."),
) -> None:
    """Select chosen/rejected pairs by SQL over the stored candidates into a named pair set."""
    engine = open_store(state(ctx).url)
    try:
        result = iterations.curate(engine, iteration, preset, lam, min_margin, name, make_default)
    finally:
        engine.dispose()
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
    device: str = typer.Option(None, "--device", help="cpu or cuda:N (default: let the trainer / accelerate decide)."),
) -> None:
    """DPO with LoRA from model version N-1 (policy and reference); merge and register version N."""
    st = state(ctx)
    engine = open_store(st.url)
    try:
        outcome = iterations.train(
            engine, st.settings, iteration,
            iterations.TrainOptions(allow_partial=allow_partial, force=force, pair_set=pair_set, device=device),
        )
    finally:
        engine.dispose()
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
    iteration: int = typer.Option(..., "--iter"),
    fmt: str = typer.Option("llava-json", "--format", help="llava-json | trl-jsonl | parquet"),
    out: Path = typer.Option(None, "--out", help="Output file (default derived from the iteration and pair set)."),
    pair_set: str = typer.Option(None, "--pair-set", help="Pair set name (default: the iteration's default set)."),
) -> None:
    """Write an iteration's pairs in the reference release's LLaVA format, TRL's preference columns, or Parquet."""
    from csr.engine.export import export_pairs

    engine = open_store(state(ctx).url)
    try:
        path, count = export_pairs(engine, iteration, fmt, out, pair_set)
    finally:
        engine.dispose()
    console.print(f"wrote {count} pair(s) to {path}")


def lineage(
    ctx: typer.Context,
    version: int = typer.Argument(..., help="Model version."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """The provenance chain of a model version back to the base model."""
    from csr.storage.versions import lineage as chain_of

    engine = open_store(state(ctx).url)
    try:
        with engine.connect().execution_options(sqlite_begin="DEFERRED") as conn:
            chain = chain_of(conn, version)
    finally:
        engine.dispose()
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
    start: int = typer.Option(..., "--from", help="First iteration."),
    end: int = typer.Option(..., "--to", help="Last iteration."),
    device: str = typer.Option("cpu", "--device"),
    batch_prompts: int = typer.Option(4, "--batch-prompts", min=1),
    quiet: bool = typer.Option(False, "--quiet"),
) -> None:
    """generate -> curate -> train for each iteration; resumable at any step."""
    from csr.cli.generate_cmds import generate

    st = state(ctx)
    if end < start:
        raise CsrError(f"--to ({end}) is before --from ({start})")
    for number in range(start, end + 1):
        engine = open_store(st.url)
        try:
            with engine.connect().execution_options(sqlite_begin="DEFERRED") as conn:
                trained = model_version(conn, number) is not None
        finally:
            engine.dispose()
        if trained:
            console.print(f"iteration {number}: model version {number} exists, skipping")
            continue
        ctx.invoke(generate, ctx=ctx, iteration=number, device=device, batch_prompts=batch_prompts, quiet=quiet,
                   preset=None, lam=None, select_by=None, devices=None, workers=1, limit=None,
                   lease_seconds=120.0, max_attempts=3)
        ctx.invoke(curate, ctx=ctx, iteration=number, preset=None, lam=None, min_margin=0.0, name=None,
                   make_default=False)
        ctx.invoke(train, ctx=ctx, iteration=number, allow_partial=False, force=False, pair_set=None,
                   device=None if device == "cpu" else device)


def register(app: typer.Typer) -> None:
    app.command("curate")(curate)
    app.command("train")(train)
    app.command("export")(export)
    app.command("lineage")(lineage)
    app.command("iterate")(iterate)
