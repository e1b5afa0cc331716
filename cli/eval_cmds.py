"""`csr eval chair | pope | record`: benchmarks of model versions, stored per version."""

from __future__ import annotations

import json
import math
from pathlib import Path

import typer

from csr.cli.context import state
from csr.cli.output import Console, consoles, echo_json, json_option
from csr.cli.vocabulary import (
    DEVICE_HELP,
    MODEL_VERSION_HELP,
    MODEL_VERSIONS_HELP,
    default_device,
)
from csr.engine.errors import CsrError
from csr.storage import Store

console = Console()
eval_app = typer.Typer(rich_markup_mode=None, help="Evaluate model versions (CHAIR, POPE) or record other benchmarks' results.",
                       no_args_is_help=True)


def parse_versions(text: str) -> list[int]:
    """"0-3" -> [0, 1, 2, 3]; "0,2,5-6" -> [0, 2, 5, 6]; order kept, repeats dropped."""
    versions: list[int] = []
    for part in text.split(","):
        part = part.strip()
        try:
            if "-" in part:
                low, high = (int(x) for x in part.split("-", 1))
                if low > high:
                    raise ValueError
                versions.extend(range(low, high + 1))
            else:
                versions.append(int(part))
        except ValueError:
            raise CsrError(f"--model-versions {text!r}: expected N, A-B or a comma-separated list of them") from None
    if any(v < 0 for v in versions):
        raise CsrError(f"--model-versions {text!r}: versions are not negative")
    return list(dict.fromkeys(versions))


def _versions(version: int | None, versions: str | None) -> list[int]:
    if (version is None) == (versions is None):
        raise CsrError("give exactly one of --model-version and --model-versions")
    return [version] if version is not None else parse_versions(versions)


def _say_fewer(out: Console, found: int, asked: int | None, which: str) -> None:
    """A draw of `asked` images from a set that holds fewer takes them all: say so."""
    if asked is not None and found < asked:
        out.print(f"note: {which} {found} image(s), fewer than the {asked} asked for (--limit): "
                  f"evaluating on {found}", highlight=False, soft_wrap=True)


def _need_file(path: Path | None) -> None:
    if path is not None and not path.is_file():
        raise CsrError(f"file not found: {path}")


def _need_dir(path: Path) -> None:
    if not path.is_dir():
        raise CsrError(f"images directory not found: {path}")


DECODER_HELP = ("engine: csr's batched decoder (same tokens as generate, faster); generate: transformers' "
                "generate, batch by batch. Models the engine's decoder does not support use generate either way.")


def _note(out: Console):
    return lambda line: out.print(line, highlight=False, soft_wrap=True)


def _interval(ci) -> str:
    return f"[{ci[0]:.3f}, {ci[1]:.3f}]"


@eval_app.command("chair")
def eval_chair(
    ctx: typer.Context,
    version: int = typer.Option(None, "--model-version", help=MODEL_VERSION_HELP),
    versions: str = typer.Option(None, "--model-versions", help=MODEL_VERSIONS_HELP),
    annotations: Path = typer.Option(..., "--annotations", help="COCO-style instances JSON (images, annotations, categories)."),
    images: Path = typer.Option(..., "--images", help="Directory holding the annotations' image files."),
    synonyms: Path = typer.Option(None, "--synonyms", help="Synonyms file (category, synonyms... per line); default: the COCO table shipped with csr."),
    captions: Path = typer.Option(None, "--captions", help="COCO captions JSON: objects the reference captions mention count as present (standard CHAIR)."),
    prompt: str = typer.Option(None, "--prompt", help="Default: 'Please describe this image in detail.' (docs/evaluation.md)."),
    max_new_tokens: int = typer.Option(None, "--max-new-tokens", min=1, help="Default 512 (docs/evaluation.md)."),
    n_images: int = typer.Option(None, "--limit", min=1, help="Images drawn from the annotations; default 500 (CSR appendix A.2)."),
    all_images: bool = typer.Option(False, "--all-images", help="Every image of the annotations."),
    seed: int = typer.Option(0, "--seed", help="Seed of the image draw and of the bootstrap interval."),
    device: str = typer.Option(None, "--device", help=DEVICE_HELP),
    batch_size: int = typer.Option(16, "--batch-size", min=1, help="Prompts decoded together (rows in flight)."),
    decoder: str = typer.Option("engine", "--decoder", help=DECODER_HELP),
    as_json: bool = json_option("The figures per model version"),
) -> None:
    """CHAIR_S / CHAIR_I / recall / length per model version, stored in the evaluations table."""
    from csr.engine.evaluate import benchmarks as evaluation
    console = consoles(as_json)
    chosen = _versions(version, versions)
    for path in (annotations, synonyms, captions):
        _need_file(path)
    _need_dir(images)
    task = evaluation.coco_chair_task(
        annotations, images, synonyms, captions,
        prompt=evaluation.CHAIR_PROMPT if prompt is None else prompt,
        max_new_tokens=max_new_tokens or evaluation.CHAIR_MAX_NEW_TOKENS,
        n_images=None if all_images else (n_images or evaluation.CHAIR_IMAGES), seed=seed,
    )
    _say_fewer(console, len(task.keys), None if all_images else (n_images or evaluation.CHAIR_IMAGES),
               "the annotations hold")
    with Store.open(state(ctx).url) as store:
        outcomes = evaluation.evaluate_versions(store, chosen, [task], device=default_device(device), batch_size=batch_size,
                                                  decoder=decoder, note=_note(console))
    truth = _chair_truth(captions)
    for done in outcomes:
        m = done.metrics
        console.print(
            f"model version {done.version} on CHAIR ({done.dataset}): CHAIR_S {m['chair_s']:.3f} "
            f"{_interval(m['ci']['chair_s'])}, CHAIR_I {m['chair_i']:.3f} {_interval(m['ci']['chair_i'])}, "
            f"recall {m['recall']:.3f} over {m['n_responses']} image(s), {m['mean_words']:.1f} words per response; "
            f"{truth}" + (" (already stored)" if done.reused else ""), highlight=False, soft_wrap=True)
    if as_json:
        echo_json(_results(outcomes))


def _results(outcomes) -> list[dict]:
    return [{"model_version": done.version, "dataset": done.dataset, "metrics": done.metrics, "reused": done.reused}
            for done in outcomes]


def _chair_truth(captions: Path | None) -> str:
    if captions is not None:
        return f"ground truth: instance annotations and the captions of {captions.name}, as the standard CHAIR"
    # The reference (chair.py, get_annotations) adds the objects the reference captions
    # name; without them more mentions count as hallucinated than in published figures.
    return ("ground truth: instance annotations only (no --captions): CHAIR reads higher than "
            "the standard CHAIR, which adds the objects of the reference captions")


@eval_app.command("pope")
def eval_pope(
    ctx: typer.Context,
    version: int = typer.Option(None, "--model-version", help=MODEL_VERSION_HELP),
    versions: str = typer.Option(None, "--model-versions", help=MODEL_VERSIONS_HELP),
    images: Path = typer.Option(..., "--images", help="Directory holding the images."),
    annotations: Path = typer.Option(None, "--annotations", help="COCO-style instances JSON to build the questions from."),
    questions: list[Path] = typer.Option(None, "--questions", help="Ready-made POPE question file (JSONL: image, text, label); repeat for several settings."),
    setting: list[str] = typer.Option(None, "--setting", help="random | popular | adversarial (repeatable; default all three)."),
    n_images: int = typer.Option(None, "--limit", min=1, help="Images the questions are about; default 500 (POPE)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the question sampling and the bootstrap interval."),
    suffix: str = typer.Option(None, "--suffix", help="Appended to each question; default LLaVA-1.5's ' Answer the question using a single word or phrase.'"),
    max_new_tokens: int = typer.Option(None, "--max-new-tokens", min=1, help="Default 128 (LLaVA-1.5's POPE evaluation)."),
    device: str = typer.Option(None, "--device", help=DEVICE_HELP),
    batch_size: int = typer.Option(16, "--batch-size", min=1, help="Prompts decoded together (rows in flight)."),
    decoder: str = typer.Option("engine", "--decoder", help=DECODER_HELP),
    as_json: bool = json_option("The figures per setting and model version"),
) -> None:
    """POPE accuracy / precision / recall / F1 / yes-ratio per setting and model version, stored."""
    from csr.engine.evaluate import benchmarks as evaluation
    from csr.engine.evaluate import pope
    console = consoles(as_json)
    chosen = _versions(version, versions)
    if (annotations is None) == (not questions):
        raise CsrError("give either --annotations (questions are built) or --questions (ready-made files)")
    for path in (annotations, *(questions or [])):
        _need_file(path)
    _need_dir(images)
    unknown = sorted(set(setting or []) - set(pope.SETTINGS))
    if unknown:
        raise CsrError(f"unknown POPE setting {unknown[0]!r}; choose from {', '.join(pope.SETTINGS)}")
    common = {"suffix": evaluation.POPE_SUFFIX if suffix is None else suffix,
              "max_new_tokens": max_new_tokens or evaluation.POPE_MAX_NEW_TOKENS}
    if annotations is not None:
        task = evaluation.coco_pope_task(annotations, images, settings=setting or pope.SETTINGS,
                                         n_images=n_images or pope.N_IMAGES, seed=seed, **common)
        _say_fewer(console, len(task.images), n_images or pope.N_IMAGES,
                   "the annotations have, with at least 3 objects each,")
    else:
        if setting:
            raise CsrError("--setting applies to --annotations; a question file names its own setting")
        task = evaluation.pope_file_task(questions, images, **common)
    with Store.open(state(ctx).url) as store:
        outcomes = evaluation.evaluate_versions(store, chosen, [task], device=default_device(device), batch_size=batch_size,
                                                  decoder=decoder, note=_note(console))
    for done in outcomes:
        for name, m in done.metrics.items():
            console.print(
                f"model version {done.version} on POPE {name} ({task.dataset}): accuracy {m['accuracy']:.3f}, "
                f"precision {m['precision']:.3f}, recall {m['recall']:.3f}, F1 {m['f1']:.3f} "
                f"{_interval(m['f1_ci'])}, yes-ratio {m['yes_ratio']:.3f} over {m['n']} question(s), "
                f"{m['unparsed']} with neither yes nor no (read as yes, as the reference does)" + (" (already stored)" if done.reused else ""),
                highlight=False, soft_wrap=True)
    if as_json:
        echo_json(_results(outcomes))


@eval_app.command("record")
def eval_record(
    ctx: typer.Context,
    version: int = typer.Option(..., "--model-version", help="Model version the results belong to."),
    benchmark: str = typer.Option(..., "--benchmark", help="Benchmark name, e.g. mme, seed, mmbench, llava-w."),
    metric: list[str] = typer.Option(None, "--metric", help="NAME=VALUE (repeatable), e.g. perception=1510.7."),
    metrics_json: Path = typer.Option(None, "--metrics-json", help="JSON object of NAME: number (e.g. from lmms-eval)."),
    dataset: str = typer.Option("", "--dataset", help="Data set label or version, e.g. MME 2023-06."),
    tool: str = typer.Option("", "--tool", help="What produced the numbers, e.g. 'lmms-eval 0.3.0'."),
    as_json: bool = json_option("What was stored"),
) -> None:
    """Store metrics a user measured elsewhere (lmms-eval, VLMEvalKit) for a model version."""
    from csr.engine.evaluate.benchmarks import record_external

    values: dict[str, float] = {}
    for item in metric or []:
        name, sep, raw = item.partition("=")
        try:
            number = float(raw)
        except ValueError:
            number = math.nan
        if not sep or not name.strip() or not math.isfinite(number):
            raise CsrError(f"--metric {item!r}: expected NAME=NUMBER")
        values[name.strip()] = number
    if metrics_json is not None:
        _need_file(metrics_json)
        try:
            data = json.loads(metrics_json.read_text())
        except json.JSONDecodeError as exc:
            raise CsrError(f"{metrics_json}: not JSON ({exc})") from None
        if not isinstance(data, dict) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in data.values()):
            raise CsrError(f"{metrics_json}: expected a JSON object of name: number")
        values |= {str(k): float(v) for k, v in data.items()}
    if not values:
        raise CsrError("no metrics given: use --metric NAME=VALUE or --metrics-json FILE")
    with Store.open(state(ctx).url) as store:
        added = record_external(store, version, benchmark.strip(), values, dataset, tool)
    if as_json:
        echo_json({"model_version": version, "benchmark": benchmark.strip(), "dataset": dataset, "tool": tool,
                   "metrics": values, "added": bool(added)})
        return
    shown = ", ".join(f"{k} {v:g}" for k, v in values.items())
    console.print(f"model version {version} on {benchmark}: {shown}"
                  + ("" if added else " (already recorded, unchanged)"), highlight=False)


def register(app: typer.Typer) -> None:
    app.add_typer(eval_app, name="eval")
