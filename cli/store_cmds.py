"""init, db upgrade, prompts import, status."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from csr.cli.context import state
from csr.engine.errors import CsrError
from csr.engine.settings import DEFAULT_CLIP, DEFAULT_CLIP_PRETRAINED, DEFAULT_MODEL
from csr.storage import migrate, work
from csr.storage.store import Store
from csr.storage.versions import BaseModelMismatch, describe_base_model

console = Console()
db_app = typer.Typer(help="Store schema maintenance.", no_args_is_help=True, rich_markup_mode=None)
prompts_app = typer.Typer(help="Prompt sets.", no_args_is_help=True, rich_markup_mode=None)


def init(
    ctx: typer.Context,
    model: str = typer.Option(None, "--model", help=f"Base LVLM: hub id or local directory (default {DEFAULT_MODEL})."),
    clip: str = typer.Option(None, "--clip", help=f"open_clip model name, hf-hub:ID or local-dir:PATH (default {DEFAULT_CLIP})."),
    clip_pretrained: str = typer.Option(None, "--clip-pretrained", help=f"open_clip pretrained tag (default {DEFAULT_CLIP_PRETRAINED}); ignored for hf-hub: and local-dir:."),
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
    if settings.clip.startswith("local-dir:"):
        settings.clip = "local-dir:" + str(Path(settings.clip[len("local-dir:"):]).resolve())
    url = st.url
    store, what = Store.create(url)
    try:
        with store, store.write() as tx:
            registered = tx.register_base_model(settings.model, settings.clip, settings.clip_pretrained)
    except BaseModelMismatch as exc:
        asked = describe_base_model(settings.model, settings.clip, settings.clip_pretrained)
        raise CsrError(
            f"the store at {_display(url)} already holds a study of {exc.registered}; its base model never "
            f"changes, so {asked} is a new study: run `csr init` in another directory, or `csr --db NEW_URL init`"
        ) from exc
    if st.db or not settings.path.exists():
        settings.store_url = st.db or settings.store_url
    settings.write()
    console.print(f"store {what} at {_display(url)} (schema {migrate.head_revision()}); base model {registered}: "
                  f"{settings.model}, CLIP {settings.clip}; settings in {settings.path}")


def _looks_local(name: str) -> bool:
    return name.startswith((".", "/", "~")) or Path(name).exists()


def _display(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


@db_app.command("upgrade")
def db_upgrade(ctx: typer.Context) -> None:
    """Migrate the store to the schema this csr needs (back it up first)."""
    before, after = Store.upgrade(state(ctx).url)
    if before == after:
        console.print(f"store already at schema {after}")
    else:
        console.print(f"store upgraded from schema {before or 'empty'} to {after}")


@db_app.command("revision")
def db_revision(ctx: typer.Context) -> None:
    """Print the store's schema revision and the one this csr needs."""
    console.print(f"store: {Store.revision(state(ctx).url)}  csr: {migrate.head_revision()}")


@prompts_app.command("import")
def prompts_import(
    ctx: typer.Context,
    file: Path = typer.Argument(..., help="LLaVA instruction JSON (id, image, conversations|input) or JSONL (id, image, prompt)."),
    images: Path = typer.Option(..., "--images", help="Directory the image paths are resolved under."),
    image_prefix: str = typer.Option("", "--image-prefix", help="Filename prefix added to each image name, e.g. COCO_train2014_."),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Import the good records and list the bad ones instead of importing nothing."),
) -> None:
    """Import prompts: all or nothing, idempotent."""
    from csr.engine.io.importing import import_prompts

    with Store.open(state(ctx).url) as store:
        report = import_prompts(store, file, images, image_prefix=image_prefix, skip_bad=skip_bad)
    console.print(
        f"imported {report.added} prompt(s) ({report.new_images} new image(s)); "
        f"{report.already_present} already present; {len(report.skipped)} skipped"
    )
    for problem in report.skipped:
        typer.echo(f"skipped {problem}", err=True)


def status_cmd(
    ctx: typer.Context,
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Per iteration: prompts total / pending / claimed / done / failed; model versions; workers
    (live, stale or gone); failed prompts with their reason."""
    with Store.open(state(ctx).url) as store, store.read() as tx:
        summary = tx.status()
        summary["workers"] = tx.worker_states()
        summary["failed_prompts"] = tx.failed_items()
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
        return
    console.print(f"prompts: {summary['prompts']}")
    table = Table("iteration", "state", "preset", "policy", "prompts", "pending", "claimed", "done", "failed")
    for it in summary["iterations"]:
        table.add_row(*(str(it[k]) for k in ("iteration", "state", "preset", "policy_version", "prompts", "pending", "claimed", "done", "failed")))
    if summary["iterations"]:
        console.print(table)
    else:
        console.print("no iteration started yet (csr generate --iter 1)")
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
    live = sum(w["state"] == work.LIVE for w in workers)
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
    console.print(f"{len(failed)} failed prompt(s){more}; `csr generate --iter N --retry-failed` tries them again")


def register(app: typer.Typer) -> None:
    app.command("init")(init)
    app.command("status")(status_cmd)
    app.add_typer(db_app, name="db")
    app.add_typer(prompts_app, name="prompts")
