"""`csr demo`: the built-in shapes world, CHAIR and POPE per model version."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from csr.cli.output import Console, json_option
from csr.cli.vocabulary import (
    DEVICE_HELP,
    Preset,
    default_device,
    iteration_range,
)
from csr.engine.demo.run import DemoMethod
from csr.engine.errors import CsrError
from csr.engine.evaluate.pope import SETTINGS as POPE_SETTINGS

stdout_console = Console()


def demo(
    directory: Path = typer.Option(Path("csr-demo"), "--dir", help="Study directory (world, models, store)."),
    iterations_: str = typer.Option("1-3", "--iter", help="CSR iterations to run, from 1: 1-N."),
    prompts: int = typer.Option(1000, "--prompts", min=2, help="CSR prompts (images of the world) per iteration."),
    heldout: int = typer.Option(1000, "--heldout", min=1,
                                 help="Held-out images for CHAIR and POPE (1000: docs/evaluation.md)."),
    model_scenes: int = typer.Option(2000, "--model-scenes", min=1,
                                     help="Scenes the tiny models learn from (other than the prompts)."),
    seed: int = typer.Option(0, "--seed", help="World, model and training seed."),
    lam: float = typer.Option(0.9, "--lambda", help="Weight of R_I in R(s); 0 and 1 are the paper's ablations."),
    preset: Preset = typer.Option(Preset.paper, "--preset", help="Reward preset (docs/presets.md)."),
    method: DemoMethod = typer.Option(DemoMethod.csr, "--method", help="How each iteration makes pairs: csr, self-reward (the baseline), or truth-pairs (pairs made from the world's ground truth and imported, the stand-in for preference data from elsewhere)."),
    quick: bool = typer.Option(False, "--quick", help="Smaller demo models (for tests)."),
    device: str = typer.Option(None, "--device", help=DEVICE_HELP),
    as_json: bool = json_option("The per-version results (the tables go to stderr)"),
    out: Path = typer.Option(None, "--out", help="Also write the per-version results to this JSON file path."),
) -> None:
    """Run CSR end to end on the built-in world and print CHAIR and POPE per model version."""
    import dataclasses
    import json

    from csr.engine.demo.run import DemoOptions, run_demo

    console = Console(stderr=True) if as_json else stdout_console
    iterations = _iteration_count(iterations_)
    preset = preset.value
    report = run_demo(
        DemoOptions(directory=directory, iterations=iterations, prompts=prompts, heldout=heldout, seed=seed,
                    lambda_weight=lam, model_scenes=model_scenes, size="quick" if quick else "default",
                    device=default_device(device), generate={"preset": preset}, method=method.value),
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
    results = json.dumps({
        "method": method.value, "lambda": lam, "preset": preset, "seed": seed, "iterations": iterations, "prompts": prompts, "heldout": heldout,
        "wall_seconds": report.wall_seconds, "versions": [dataclasses.asdict(r) for r in report.rows],
        "empty_iteration": report.empty_iteration,
    }, indent=2)
    if out is not None:
        out.write_text(results)
    console.print(f"store: {report.store_url}")
    console.print(f"wall time: {report.wall_seconds:.1f} s")
    if as_json:
        typer.echo(results)


def _iteration_count(text: str) -> int:
    numbers = iteration_range(text)
    if numbers[0] != 1:
        raise CsrError(f"the demo runs its iterations from 1: --iter 1-{numbers[-1]}, not {text!r}")
    return numbers[-1]


def _ci(interval) -> str:
    return f"[{interval[0]:.3f}, {interval[1]:.3f}]"


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)
