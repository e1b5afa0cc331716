"""curate, train, export, lineage, iterate."""

from __future__ import annotations

from pathlib import Path

import typer

from csr.cli.context import state
from csr.cli.output import Console, consoles, echo_json, json_option
from csr.cli.vocabulary import (
    DEVICE_HELP,
    DType,
    ExportFormat,
    PairRule,
    Preset,
    ReportTo,
    SelectBy,
    iteration_range,
    value,
)
from csr.engine import iterations
from csr.engine.errors import CsrError
from csr.engine.pipeline import run_iteration
from csr.engine.self_reward import Method
from csr.storage import Store

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
    as_json: bool = json_option("The pair set"),
) -> None:
    """Select chosen/rejected pairs by SQL over the stored responses into a named pair set."""
    with Store.open(state(ctx).url) as store:
        result = iterations.curate(store, iteration, value(preset), lam, min_margin, pair_set, make_default,
                                    value(pair_rule))
    if as_json:
        echo_json(curated_json(iteration, result))
        return
    _say_curated(result, console)


def curated_json(iteration: int, result) -> dict:
    return {"iteration": iteration, "pair_set": result.name, "pairs": result.pairs, "result_hash": result.result_hash,
            "created": result.created, "default": result.is_default, "note": result.note}


def _say_curated(result, out: Console) -> None:
    verb = "created" if result.created else "unchanged"
    default = " (default)" if result.is_default else ""
    out.print(f"pair set {result.name!r}{default} {verb}: {result.pairs} pair(s), hash {result.result_hash[:16]}")
    if result.note:
        out.print(result.note)


def train(
    ctx: typer.Context,
    iteration: int = typer.Option(..., "--iter", help="Train model version N from N-1 on iteration N's pairs."),
    allow_partial: bool = typer.Option(False, "--allow-partial", help="Train although some prompts are not generated yet."),
    force: bool = typer.Option(False, "--force", help="Replace an existing model version N."),
    pair_set: str = typer.Option(None, "--pair-set", help="Pair set name (default: the iteration's default set)."),
    device: str = typer.Option(None, "--device", help=DEVICE_HELP + " Under `accelerate launch` leave it unset: accelerate places each process."),
    report_to: ReportTo = typer.Option(None, "--report-to", help="Where TRL reports training logs besides the store (default: [train] report_to, none)."),
    as_json: bool = json_option("The new model version"),
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
    if as_json:
        echo_json(trained_json(outcome))
        return
    _say_trained(outcome, console)


def trained_json(outcome: iterations.TrainOutcome) -> dict:
    import dataclasses

    return {"model_version": outcome.version, **{k: v for k, v in dataclasses.asdict(outcome).items() if k != "version"}}


def _say_trained(outcome: iterations.TrainOutcome, out: Console) -> None:
    resumed = f", resumed from step {outcome.resumed_from_step}" if outcome.resumed_from_step else ""
    loss = outcome.final_metrics.get("loss")
    out.print(
        f"model version {outcome.version} saved to {outcome.path} (weights {outcome.weights_hash[:16]}) "
        f"from {outcome.pairs} pair(s) in {outcome.train_seconds:.1f} s{resumed}"
        + (f"; final loss {loss:.4f}" if loss is not None else "")
    )
    out.print(f"reference log-probs: {outcome.reference}")
    if outcome.skipped_too_long:
        out.print(
            f"{outcome.skipped_too_long} pair(s) left out: a response is longer than max_response_tokens "
            "(never cut; raise [train] max_response_tokens, or set too_long = \"refuse\")"
        )
    for external_id, reason in outcome.skipped_unencodable:
        console.print(f"pair of prompt {external_id} left out: {reason}")
    if outcome.skipped_unencodable:
        console.print(
            f"{len(outcome.skipped_unencodable)} pair(s) left out as unencodable "
            "(set [train] unencodable = \"refuse\" to stop instead)"
        )


def export(
    ctx: typer.Context,
    iteration: int = typer.Option(..., "--iter", help="Iteration whose pairs to export."),
    fmt: ExportFormat = typer.Option(ExportFormat.llava_json, "--format", help="The reference release's LLaVA JSON, TRL's preference JSONL, or Parquet with every score."),
    out: Path = typer.Option(None, "--out", help="Output file path (default derived from the iteration and pair set)."),
    pair_set: str = typer.Option(None, "--pair-set", help="Pair set name (default: the iteration's default set)."),
    as_json: bool = json_option("The file written"),
) -> None:
    """Write an iteration's pairs in the reference release's LLaVA format, TRL's preference columns, or Parquet."""
    from csr.engine.io.export import export_pairs

    with Store.open(state(ctx).url) as store:
        path, count = export_pairs(store, iteration, fmt.value, out, pair_set)
    if as_json:
        echo_json({"iteration": iteration, "format": fmt.value, "path": str(path), "pairs": count})
        return
    console.print(f"wrote {count} pair(s) to {path}")


def lineage(
    ctx: typer.Context,
    version: int = typer.Option(..., "--model-version", help="Model version to trace."),
    show_sql: bool = typer.Option(False, "--sql", help="Also print the queries that selected the pairs and the training rows."),
    as_json: bool = json_option("The chain"),
) -> None:
    """The provenance chain of a model version back to the base model."""
    with Store.open(state(ctx).url) as store:
        chain = store.lineage(version)
    if not chain:
        raise CsrError(f"no model version {version} in the store")
    if as_json:
        echo_json(chain)
        return
    for entry in chain:
        for line in lineage_lines(entry, show_sql):
            console.print(line, highlight=False, markup=False, soft_wrap=True)


def _pairs(values: dict | None) -> str:
    """{"a": 1, "b": {"c": 2}} -> "a=1, b.c=2": settings as a reader types them."""
    flat: list[str] = []

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict):
            for key, inner in value.items():
                walk(f"{prefix}{key}.", inner)
        else:
            flat.append(f"{prefix[:-1]}={value}")

    walk("", values or {})
    return ", ".join(flat) or "-"


def lineage_lines(entry: dict, show_sql: bool = False) -> list[str]:
    lines = [f"model version {entry['version']}  {entry['path']}"]
    if entry["weights_hash"]:
        lines.append(f"  weights: sha256 {entry['weights_hash']}")
    else:
        lines.append("  weights: the base model's, as published (not hashed)")
    if "training_run" not in entry:
        lines.append(f"  base model {entry['base_model']}, CLIP {entry['clip']} {entry['clip_pretrained'] or ''}".rstrip())
        return lines
    run, ps, gen = entry["training_run"], entry["pair_set"], entry["generation"]
    metrics = entry.get("metrics") or {}
    lines.append(f"  trained by run {run['id']} on pair set {ps['name']!r} of iteration {run['iteration']} "
                 f"(pairs hash {run['pairs_hash'][:16]}, pair-set hash {ps['result_hash'][:16]})")
    if ps.get("source") == "import":
        origin = ps.get("origin") or {}
        lines.append(f"  pairs imported from {origin.get('path')} (layouts {_pairs(origin.get('layouts'))}; "
                     f"images under {origin.get('images')}): no tree, reference recomputed")
    else:
        lines.append(f"  pair selection: preset {ps['preset']}; {_pairs(ps['params'])}")
    lines.append(f"  hyper-parameters: {_pairs(run['hyperparams'])}")
    used = metrics.get("reference")
    asked = (run["hyperparams"] or {}).get("reference")
    if used:
        lines.append(f"  reference log-probs: {used}" + (f" ([train] reference = {asked})" if asked else ""))
    final = metrics.get("final") or {}
    if final.get("loss") is not None:
        lines.append(f"  result: final loss {final['loss']:.4f} from {metrics.get('pairs', '?')} pair(s) "
                     f"in {metrics.get('train_seconds', 0):.1f} s")
    if gen.get("method") == "self-reward":
        shown = {k: v for k, v in gen["config"].get("self_reward", {}).items() if k != "judge_prompt"}
        lines.append(f"  responses sampled and judged (self-rewarding) by model version {gen['policy_version']}; "
                     f"{_pairs(shown)} (the judge prompt: --json)")
    elif gen.get("method") != "outside":
        lines.append(f"  candidates generated by model version {gen['policy_version']} with preset {gen['preset']}; "
                     f"search {_pairs(gen['config'].get('search'))}")
    if show_sql:
        lines.append(f"  pair selection query: {' '.join((ps.get('selection_sql') or '').split())}")
        lines.append(f"  training query: {' '.join(run['selection_sql'].split())}")
    return lines


def iterate(
    ctx: typer.Context,
    iterations_: str = typer.Option(..., "--iter", help="Iterations to run: N or A-B, e.g. 1-3."),
    method: Method = typer.Option(None, "--method", help="How each new iteration makes pairs: csr or self-reward (as `csr generate --method`)."),
    preset: Preset = typer.Option(None, "--preset", help="Reward preset (default: csr.toml or paper)."),
    lam: float = typer.Option(None, "--lambda", help="Weight of R_I in R(s) (default 0.9)."),
    select_by: SelectBy = typer.Option(None, "--select-by", help="Selection key of the search (default: the preset's)."),
    device: str = typer.Option(None, "--device", help=DEVICE_HELP),
    devices: str = typer.Option(None, "--devices", help="With --workers: one device per generation worker, comma-separated (cuda:0,cuda:1)."),
    workers: int = typer.Option(1, "--workers", min=1, help="Generation worker processes."),
    batch_prompts: int = typer.Option(4, "--batch-prompts", min=1, help="Prompts claimed per lease."),
    limit: int = typer.Option(None, "--limit", min=1, help="Generate: stop each iteration after this many prompts (training then needs --allow-partial)."),
    lease_seconds: float = typer.Option(120.0, "--lease-seconds", min=1.0, help="How long a claim survives without a heartbeat."),
    max_attempts: int = typer.Option(3, "--max-attempts", min=1, help="Attempts before a prompt is marked failed."),
    no_wait: bool = typer.Option(False, "--no-wait", help="Generate: when other workers still hold prompts, say so and exit 1 instead of waiting to take them over."),
    retry_failed: bool = typer.Option(False, "--retry-failed", help="Generate: put each iteration's failed prompts back to pending first."),
    store_retry_seconds: float = typer.Option(300.0, "--store-retry-seconds", min=0.0, help="How long to retry a lost store connection before giving up."),
    dtype: DType = typer.Option(None, "--dtype", help="Policy dtype for the search (recorded with each iteration)."),
    kv_budget: float = typer.Option(None, "--kv-budget", min=0.0, help="GiB of KV cache a batch of prompts may hold."),
    min_margin: float = typer.Option(0.0, "--min-margin", help="Drop pairs whose reward margin is below this."),
    pair_rule: PairRule = typer.Option(None, "--pair-rule", help="How each prompt's pair is picked: distinct or depth-first (as `csr curate --pair-rule`; default: the preset's)."),
    pair_set: str = typer.Option(None, "--pair-set", help="Curate into and train on the pair set of this name (default: each iteration's default set)."),
    allow_partial: bool = typer.Option(False, "--allow-partial", help="Train although some prompts are not generated yet."),
    force: bool = typer.Option(False, "--force", help="Train model versions that exist again, replacing them."),
    report_to: ReportTo = typer.Option(None, "--report-to", help="Where TRL reports training logs besides the store."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
    as_json: bool = json_option("Per iteration: the pair set and the model version"),
) -> None:
    """generate -> curate -> train for each iteration, with the options of each step; resumable at any step."""
    from csr.cli.generate_cmds import generate_request, run_generate

    st = state(ctx)
    numbers = iteration_range(iterations_)  # a bad range is refused before the store is opened
    settings = st.settings
    if report_to is not None:
        settings.train = {**settings.train, "report_to": report_to.value}

    def generate_step(number: int) -> None:
        request = generate_request(
            st, number, method=method, preset=preset, lam=lam, select_by=select_by, device=device, devices=devices,
            workers=workers, batch_prompts=batch_prompts, limit=limit, lease_seconds=lease_seconds,
            max_attempts=max_attempts, no_wait=no_wait, retry_failed=retry_failed,
            store_retry_seconds=store_retry_seconds, dtype=dtype, kv_budget=kv_budget,
        )
        run_generate(st, request, quiet)

    out = consoles(as_json)
    train_options = iterations.TrainOptions(allow_partial=allow_partial, force=force, pair_set=pair_set, device=device)
    results = []
    with Store.open(st.url) as store:
        for number in numbers:
            done = run_iteration(store, settings, number, generate_step, train_options, min_margin=min_margin,
                                 pair_rule=value(pair_rule))
            results.append({"iteration": number, "kept": done.kept,
                            "curated": None if done.curated is None else curated_json(number, done.curated),
                            "trained": None if done.trained is None else trained_json(done.trained)})
            if done.kept:
                out.print(f"iteration {number}: model version {number} exists, skipping (--force trains it again)")
                continue
            _say_curated(done.curated, out)
            _say_trained(done.trained, out)
    if as_json:
        echo_json(results)


def register(app: typer.Typer) -> None:
    app.command("curate")(curate)
    app.command("train")(train)
    app.command("export")(export)
    app.command("lineage")(lineage)
    app.command("iterate")(iterate)
