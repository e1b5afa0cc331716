"""pairs import: preference data from elsewhere as a named pair set."""

from __future__ import annotations

from pathlib import Path

import typer

from csr.cli.context import state
from csr.cli.output import consoles, echo_json, json_option
from csr.storage import Store

pairs_app = typer.Typer(help="Pair sets from elsewhere.", no_args_is_help=True, rich_markup_mode=None)


@pairs_app.command("import")
def pairs_import(
    ctx: typer.Context,
    file: Path = typer.Argument(..., help="JSON list or JSONL: TRL prompt/chosen/rejected with an image, LLaVA-style conversations, RLHF-V or VLFeedback as published."),
    images: Path = typer.Option(..., "--images", help="Directory the image paths are resolved under."),
    name: str = typer.Option(..., "--pair-set", help="Name of the new pair set (train on it: `csr train --iter N --pair-set NAME`)."),
    as_json: bool = json_option("The pair set"),
) -> None:
    """Import preference pairs as a pair set: all or nothing, idempotent."""
    from csr.engine.io.pair_import import PairsRejected, import_pairs

    with Store.open(state(ctx).url) as store:
        try:
            report = import_pairs(store, file, images, name)
        except PairsRejected as exc:
            for problem in exc.problems:
                typer.echo(f"csr: {file}: {problem}", err=True)
            raise
    console = consoles(as_json)
    layouts = ", ".join(f"{count} {layout}" for layout, count in sorted(report.layouts.items()))
    if report.created:
        console.print(f"imported pair set {name!r}: {report.pairs} pair(s) ({layouts}; "
                      f"{report.new_images} new image(s))", highlight=False)
    else:
        console.print(f"pair set {name!r} is already imported with these {report.pairs} pair(s); nothing added",
                      highlight=False)
    if report.without_preference:
        console.print(f"{len(report.without_preference)} record(s) without a preference (equal ratings) left out",
                      highlight=False)
    if as_json:
        echo_json({"pair_set": name, "created": report.created, "pairs": report.pairs, "layouts": report.layouts,
                   "new_images": report.new_images, "without_preference": len(report.without_preference)})


def register(app: typer.Typer) -> None:
    app.add_typer(pairs_app, name="pairs")
