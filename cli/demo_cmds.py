"""`csr demo` (the built-in shapes world) and `csr eval chair` (real data)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from csr.cli.context import state
from csr.storage.store import open_store

console = Console()
eval_app = typer.Typer(help="Evaluate model versions.", no_args_is_help=True)


def demo(
    directory: Path = typer.Option(Path("csr-demo"), "--dir", help="Study directory (world, models, store)."),
    iterations: int = typer.Option(3, "--iterations", min=1, help="CSR iterations to run."),
    prompts: int = typer.Option(1000, "--prompts", min=2, help="CSR prompts (images of the world) per iteration."),
    heldout: int = typer.Option(100, "--heldout", min=1, help="Held-out images for CHAIR."),
    model_scenes: int = typer.Option(2000, "--model-scenes", min=1,
                                     help="Scenes the tiny models learn from (other than the prompts)."),
    seed: int = typer.Option(0, "--seed", help="World, model and training seed."),
    lam: float = typer.Option(0.9, "--lambda", help="Weight of R_I in R(s); 0 and 1 are the paper's ablations."),
    preset: str = typer.Option("paper", "--preset", help="Reward preset: paper | reference-code (README: Reward presets)."),
    quick: bool = typer.Option(False, "--quick", help="Smaller demo models (for tests)."),
    device: str = typer.Option("cpu", "--device", help="Device for generation and training, e.g. cuda:0."),
    json_out: Path = typer.Option(None, "--json", help="Also write the per-version results to this JSON file."),
) -> None:
    """Run CSR end to end on the built-in world and print CHAIR per model version."""
    from csr.engine.demo import DemoOptions, run_demo

    report = run_demo(
        DemoOptions(directory=directory, iterations=iterations, prompts=prompts, heldout=heldout, seed=seed,
                    lam=lam, model_scenes=model_scenes, size="quick" if quick else "default",
                    device=device, generate={"preset": preset}),
        say=lambda line: console.print(line, highlight=False),
    )
    table = Table("version", "CHAIR_S", "CHAIR_I", "recall", "words", "R_I chosen", "R_I rejected", "pairs",
                  title=f"demo world, {preset} preset, lambda {lam}, seed {seed}")
    for row in report.rows:
        table.add_row(
            str(row.version), f"{row.chair_s:.3f}", f"{row.chair_i:.3f}", f"{row.recall:.3f}", f"{row.mean_words:.1f}",
            "" if row.chosen_r_i is None else f"{row.chosen_r_i:.2f}",
            "" if row.rejected_r_i is None else f"{row.rejected_r_i:.2f}",
            "" if row.pairs is None else str(row.pairs),
        )
    console.print(table)
    if json_out is not None:
        import dataclasses
        import json

        json_out.write_text(json.dumps({
            "lambda": lam, "preset": preset, "seed": seed, "iterations": iterations, "prompts": prompts, "heldout": heldout,
            "wall_seconds": report.wall_seconds, "versions": [dataclasses.asdict(r) for r in report.rows],
        }, indent=2))
    console.print(f"store: {report.store_url}")
    console.print(f"wall time: {report.wall_seconds:.1f} s")


@eval_app.command("chair")
def eval_chair(
    ctx: typer.Context,
    version: int = typer.Option(..., "--version", help="Model version to evaluate."),
    annotations: Path = typer.Option(..., "--annotations", help="COCO-style instances JSON (images, annotations, categories)."),
    synonyms: Path = typer.Option(..., "--synonyms", help="Text file: one category per line, its synonyms comma-separated after it."),
    images: Path = typer.Option(..., "--images", help="Directory holding the annotations' image files."),
    prompt: str = typer.Option("Describe the image in detail.", "--prompt"),
    limit: int = typer.Option(None, "--limit", min=1, help="Evaluate the first N images only."),
) -> None:
    """CHAIR_S / CHAIR_I of a model version on COCO-style annotations; stored in the evaluations table."""
    from csr.engine.errors import CsrError
    from csr.engine.evaluation import evaluate_coco

    for path in (annotations, synonyms):
        if not path.is_file():
            raise CsrError(f"file not found: {path}")
    if not images.is_dir():
        raise CsrError(f"images directory not found: {images}")
    engine = open_store(state(ctx).url)
    try:
        done = evaluate_coco(engine, version, annotations, synonyms, images, prompt, limit)
    finally:
        engine.dispose()
    console.print(f"model version {version} on {done.benchmark}: CHAIR_S {done.result.chair_s:.3f}, "
                  f"CHAIR_I {done.result.chair_i:.3f} over {done.result.n_responses} image(s), "
                  f"{done.mean_words:.1f} words per response")


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)
    app.add_typer(eval_app, name="eval")
