"""init, db current / history / upgrade, prompts import, status."""

from __future__ import annotations

import os
from pathlib import Path

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from csr.cli.context import state
from csr.cli.env_cmds import store_source
from csr.cli.output import Console, echo_json, json_option
from csr.engine.errors import CsrError
from csr.engine.settings import DEFAULT_CLIP, DEFAULT_CLIP_PRETRAINED, DEFAULT_MODEL
from csr.storage import (
    LIVE,
    BaseModelMismatch,
    Store,
    describe_base_model,
    display_url,
    schema_history,
)

console = Console()
db_app = typer.Typer(help="The store's schema: current, history, upgrade (as alembic names them).", no_args_is_help=True, rich_markup_mode=None)
prompts_app = typer.Typer(help="Prompt sets.", no_args_is_help=True, rich_markup_mode=None)


def init(
    ctx: typer.Context,
    model: str = typer.Option(None, "--model", help=f"Base LVLM: hub id or local directory (default {DEFAULT_MODEL})."),
    clip: str = typer.Option(None, "--clip", help=f"open_clip model name, hf-hub:ID or local-dir:PATH (default {DEFAULT_CLIP})."),
    clip_pretrained: str = typer.Option(None, "--clip-pretrained", help=f"open_clip pretrained tag (default {DEFAULT_CLIP_PRETRAINED}); ignored for hf-hub: and local-dir:."),
    as_json: bool = json_option("The store and the base model"),
) -> None:
    """Create the store at the current schema, register the base model as version 0, write csr.toml."""
    st = state(ctx)
    settings = st.settings
    settings.model = model or settings.model
    settings.clip = clip or settings.clip
    if clip_pretrained is not None:
        settings.clip_pretrained = clip_pretrained
    if settings.clip.startswith(("hf-hub:", "local-dir:")):
        settings.clip_pretrained = None
    if settings.clip.startswith("local-dir:") and not Path(settings.clip[len("local-dir:"):]).is_dir():
        raise CsrError(f"CLIP directory not found: {settings.clip[len('local-dir:'):]}")
    if _looks_local(settings.model):
        if not Path(settings.model).exists():
            raise CsrError(f"model directory not found: {settings.model}")
        settings.model = str(Path(settings.model).resolve())
    # A family csr cannot drive is refused before the store exists (engine/models).
    from csr.engine.models import check_family

    check_family(settings.model)
    if settings.clip.startswith("local-dir:"):
        settings.clip = "local-dir:" + str(Path(settings.clip[len("local-dir:"):]).resolve())
    url = st.url
    store, what = Store.create(url)
    try:
        with store:
            registered = store.register_base_model(settings.model, settings.clip, settings.clip_pretrained)
    except BaseModelMismatch as exc:
        asked = describe_base_model(settings.model, settings.clip, settings.clip_pretrained)
        raise CsrError(
            f"the store at {_display(url)} already holds a study of {exc.registered}; its base model never "
            f"changes, so {asked} is a new study: run `csr init` in another directory, or `csr --db NEW_URL init`"
        ) from exc
    # --db is written down for the next command; a store named by CSR_DATABASE_URL
    # stays the environment's (the file does not get the SQLite default instead).
    from_env = not st.db and bool(os.environ.get("CSR_DATABASE_URL"))
    if st.db or not settings.path.exists():
        settings.store_url = st.db or settings.store_url
    settings.write(store_url=bool(st.db) or not from_env)
    if as_json:
        echo_json({"store": _display(url), "created": what == "created", "schema": Store.head_revision(),
                   "base_model": settings.model, "clip": settings.clip, "clip_pretrained": settings.clip_pretrained,
                   "settings_file": str(settings.path)})
        return
    console.print(f"store {what} at {_display(url)} (schema {Store.head_revision()}); base model {registered}: "
                  f"{settings.model}, CLIP {settings.clip}; settings in {settings.path}",
                  highlight=False, soft_wrap=True)


def _looks_local(name: str) -> bool:
    return name.startswith((".", "/", "~")) or Path(name).exists()


_display = display_url


@db_app.command("upgrade")
def db_upgrade(ctx: typer.Context, as_json: bool = json_option("The revisions before and after")) -> None:
    """Migrate the store to the schema this csr needs (back it up first)."""
    url = state(ctx).url
    before, after = Store.upgrade(url)
    if as_json:
        echo_json({"store": _display(url), "before": before, "after": after, "upgraded": before != after})
    elif before == after:
        console.print(f"store {_display(url)} already at schema {after}", highlight=False)
    else:
        console.print(f"store {_display(url)} upgraded from schema {before or 'empty'} to {after}", highlight=False)


@db_app.command("current")
def db_current(ctx: typer.Context, as_json: bool = json_option("Both revisions")) -> None:
    """The store's schema revision and the one this csr needs."""
    url = state(ctx).url
    current, head = Store.revision(url), Store.head_revision()
    if as_json:
        echo_json({"store": _display(url), "current": current, "head": head, "up_to_date": current == head})
        return
    hint = "" if current == head else " (csr db upgrade migrates it)" if current in _revision_ids() else ""
    console.print(f"store {_display(url)}: schema {current or 'none'}; csr needs {head}{hint}", highlight=False)


def _revision_ids() -> set[str]:
    return {rev["revision"] for rev in schema_history()}


@db_app.command("history")
def db_history(as_json: bool = json_option("The revisions")) -> None:
    """The schema revisions this csr knows, oldest first."""
    revisions = schema_history()
    if as_json:
        echo_json(revisions)
        return
    for rev in revisions:
        console.print(f"{rev['down_revision'] or '<base>'} -> {rev['revision']}: {rev['message']}",
                      highlight=False, markup=False)


@prompts_app.command("import")
def prompts_import(
    ctx: typer.Context,
    file: Path = typer.Argument(..., help="LLaVA instruction JSON (id, image, conversations|input) or JSONL (id, image, prompt)."),
    images: Path = typer.Option(..., "--images", help="Directory the image paths are resolved under."),
    image_prefix: str = typer.Option("", "--image-prefix", help="Filename prefix added to each image name, e.g. COCO_train2014_."),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Import the good records and list the bad ones instead of importing nothing."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress display."),
    as_json: bool = json_option("The counts and the skipped records"),
) -> None:
    """Import prompts: all or nothing, idempotent."""
    from csr.engine.io.importing import import_prompts

    url = state(ctx).url
    with Store.open(url) as store, _import_progress(quiet) as on_step:
        report = import_prompts(store, file, images, image_prefix=image_prefix, skip_bad=skip_bad, on_step=on_step)
    if as_json:
        echo_json({"store": _display(url), "file": str(file), "added": report.added, "new_images": report.new_images,
                   "already_present": report.already_present, "skipped": [str(p) for p in report.skipped]})
        return
    console.print(
        f"imported {report.added} prompt(s) ({report.new_images} new image(s)); "
        f"{report.already_present} already present; {len(report.skipped)} skipped"
    )
    for problem in report.skipped:
        typer.echo(f"skipped {problem}", err=True)


class _import_progress:
    """Progress of an import on stderr: records read, images hashed, prompts written
    (12,856 records take 8 to 12 s)."""

    LABELS = {"records": "reading records", "images": "hashing images", "written": "writing prompts"}

    def __init__(self, quiet: bool) -> None:
        err = Console(stderr=True)
        # On a terminal only, and gone when done: a log or a pipe gets the one result line.
        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                            console=err, disable=quiet or not err.is_terminal, transient=True)
        self.tasks: dict[str, int] = {}

    def __enter__(self):
        self.bar.__enter__()
        return self.step

    def __exit__(self, *exc) -> None:
        self.bar.__exit__(*exc)

    def step(self, stage: str, done: int, total: int) -> None:
        if stage not in self.tasks:
            self.tasks[stage] = self.bar.add_task(self.LABELS.get(stage, stage), total=total)
        self.bar.update(self.tasks[stage], completed=done, total=total)


def status_cmd(
    ctx: typer.Context,
    as_json: bool = json_option("The summary"),
) -> None:
    """Per iteration: prompts total / pending / claimed / done / failed; model versions; workers
    (live, stale or gone); failed prompts with their reason."""
    st = state(ctx)
    with Store.open(st.url) as store:
        summary = {"store": _display(st.url), "store_from": store_source(st)} | store.status()
    if as_json:
        echo_json(summary)
        return
    console.print(f"store: {summary['store']} (from {summary['store_from']})", highlight=False)
    console.print(f"prompts: {summary['prompts']}")
    table = Table("iteration", "state", "preset", "policy", "prompts", "pending", "claimed", "done", "failed")
    for it in summary["iterations"]:
        table.add_row(*(str(it[k]) for k in ("iteration", "state", "preset", "policy_version", "prompts", "pending", "claimed", "done", "failed")))
    if summary["iterations"]:
        console.print(table)
    else:
        console.print("no iteration started yet (csr generate --iter 1)", highlight=False)
    versions = Table("version", "parent", "iteration", "path", "weights hash")
    for v in summary["model_versions"]:
        versions.add_row(str(v["version"]), str(v["parent"]), str(v["iteration"]), v["path"], (v["weights_hash"] or "")[:12])
    console.print(versions)
    _print_workers(summary["workers"])
    _print_failed(summary["failed_prompts"])


def _print_workers(workers: list[dict]) -> None:
    if not workers:
        console.print("live workers: none")
        return
    table = Table("worker", "iteration", "state", "host", "pid", "device", "prompts held", "heartbeat", "lease until")
    for w in workers:
        table.add_row(str(w["id"]), str(w["iteration"]), w["state"], w["host"], str(w["pid"]), w["device"],
                      str(w["prompts_held"]), w["heartbeat_at"], w["lease_expires_at"] or "")
    console.print(table)
    live = sum(w["state"] == LIVE for w in workers)
    console.print(f"live workers: {live} (stale: heartbeat older than the lease; gone: process ended)")


FAILED_SHOWN = 20


def _print_failed(failed: list[dict]) -> None:
    if not failed:
        return
    table = Table("iteration", "prompt", "attempts", "reason", title="failed prompts")
    for f in failed[:FAILED_SHOWN]:
        table.add_row(str(f["iteration"]), f["prompt"], str(f["attempts"]), f["error"] or "")
    console.print(table)
    more = f" ({len(failed) - FAILED_SHOWN} more with --json)" if len(failed) > FAILED_SHOWN else ""
    again = "; ".join(f"`csr generate --iter {it} --retry-failed`" for it in sorted({f["iteration"] for f in failed}))
    console.print(f"{len(failed)} failed prompt(s){more}; {again} tries them again", highlight=False)


def register(app: typer.Typer) -> None:
    app.command("init")(init)
    app.command("status")(status_cmd)
    app.add_typer(db_app, name="db")
    app.add_typer(prompts_app, name="prompts")
