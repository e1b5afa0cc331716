"""`csr demo`: the built-in shapes world, CHAIR and POPE per model version."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from csr.engine.pope import SETTINGS as POPE_SETTINGS

console = Console()


def demo(
    directory: Path = typer.Option(Path("csr-demo"), "--dir", help="Study directory (world, models, store)."),
    iterations: int = typer.Option(3, "--iterations", min=1, help="CSR iterations to run."),
    prompts: int = typer.Option(1000, "--prompts", min=2, help="CSR prompts (images of the world) per iteration."),
    heldout: int = typer.Option(1000, "--heldout", min=1,
                                 help="Held-out images for CHAIR and POPE (1000: docs/evaluation.md)."),
    model_scenes: int = typer.Option(2000, "--model-scenes", min=1,
                                     help="Scenes the tiny models learn from (other than the prompts)."),
    seed: int = typer.Option(0, "--seed", help="World, model and training seed."),
    lam: float = typer.Option(0.9, "--lambda", help="Weight of R_I in R(s); 0 and 1 are the paper's ablations."),
    preset: str = typer.Option("paper", "--preset", help="Reward preset: paper | reference-code (README: Reward presets)."),
    quick: bool = typer.Option(False, "--quick", help="Smaller demo models (for tests)."),
    device: str = typer.Option("cpu", "--device", help="Device for generation and training, e.g. cuda:0."),
    json_out: Path = typer.Option(None, "--json", help="Also write the per-version results to this JSON file."),
) -> None:
    """Run CSR end to end on the built-in world and print CHAIR and POPE per model version."""
    from csr.engine.demo import DemoOptions, run_demo

    report = run_demo(
        DemoOptions(directory=directory, iterations=iterations, prompts=prompts, heldout=heldout, seed=seed,
                    lam=lam, model_scenes=model_scenes, size="quick" if quick else "default",
                    device=device, generate={"preset": preset}),
        say=lambda line: console.print(line, highlight=False),
    )
    table = Table("version", "CHAIR_S [95% CI]", "CHAIR_I [95% CI]", "recall", "words", "R_I chosen",
                  "R_I rejected", "pairs", title=f"demo world, {preset} preset, lambda {lam}, seed {seed}: CHAIR")
    pope_table = Table("version", *(f"POPE F1 {s} [95% CI]" for s in POPE_SETTINGS), "yes-ratio (random)",
                       title="POPE (answers read from each version's description)")
    for row in report.rows:
        table.add_row(
            str(row.version), f"{row.chair_s:.3f} {_ci(row.chair_s_ci)}", f"{row.chair_i:.3f} {_ci(row.chair_i_ci)}",
            f"{row.recall:.3f}", f"{row.mean_words:.1f}",
            "" if row.chosen_r_i is None else f"{row.chosen_r_i:.2f}",
            "" if row.rejected_r_i is None else f"{row.rejected_r_i:.2f}",
            "" if row.pairs is None else str(row.pairs),
        )
        pope_table.add_row(
            str(row.version),
            *(f"{row.pope[s]['f1']:.3f} {_ci(row.pope[s]['f1_ci'])}" for s in POPE_SETTINGS),
            f"{row.pope['random']['yes_ratio']:.3f}",
        )
    # Wide enough for every figure when the output is a pipe or a log file.
    console.print(table, width=max(console.width, 120))
    console.print(pope_table, width=max(console.width, 100))
    if json_out is not None:
        import dataclasses
        import json

        json_out.write_text(json.dumps({
            "lambda": lam, "preset": preset, "seed": seed, "iterations": iterations, "prompts": prompts, "heldout": heldout,
            "wall_seconds": report.wall_seconds, "versions": [dataclasses.asdict(r) for r in report.rows],
        }, indent=2))
    console.print(f"store: {report.store_url}")
    console.print(f"wall time: {report.wall_seconds:.1f} s")


def _ci(interval) -> str:
    return f"[{interval[0]:.3f}, {interval[1]:.3f}]"


def register(app: typer.Typer) -> None:
    from csr.cli import eval_cmds

    app.command("demo")(demo)
    eval_cmds.register(app)
