"""CHAIR evaluation of a model version: greedy descriptions, parsed for objects."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image
from sqlalchemy import Engine

from csr.engine.chair import ChairResult, Vocabulary, chair, load_coco_ground_truth
from csr.engine.errors import CsrError
from csr.engine.prompt_files import resolve_image
from csr.storage.evaluations import record_evaluation
from csr.storage.store import model_version


@dataclass(frozen=True)
class Evaluated:
    version: int
    benchmark: str
    result: ChairResult
    mean_words: float
    responses: list[str]


def evaluate(
    engine: Engine,
    version: int,
    benchmark: str,
    images: Sequence[Image.Image | Path],
    prompts: Sequence[str],
    truths: Sequence[Iterable[str]],
    vocabulary: Vocabulary,
    max_new_tokens: int = 64,
) -> Evaluated:
    from csr.engine.demo_models import greedy_describe

    with engine.connect().execution_options(sqlite_begin="DEFERRED") as conn:
        mv = model_version(conn, version)
    if mv is None:
        raise CsrError(f"no model version {version} in the store")
    responses = greedy_describe(Path(mv.path), list(images), list(prompts), max_new_tokens=max_new_tokens)
    result = chair(responses, truths, vocabulary)
    mean_words = sum(len(r.split()) for r in responses) / max(len(responses), 1)
    with engine.begin() as conn:
        record_evaluation(
            conn,
            model_version=version,
            benchmark=benchmark,
            n_responses=result.n_responses,
            chair_s=result.chair_s,
            chair_i=result.chair_i,
            mean_words=mean_words,
            details={**result.summary(), "examples": responses[:5]},
        )
    return Evaluated(version, benchmark, result, mean_words, responses)


def evaluate_coco(
    engine: Engine,
    version: int,
    annotations: Path,
    synonyms: Path,
    images_dir: Path,
    prompt: str,
    limit: int | None = None,
) -> Evaluated:
    """CHAIR on COCO-style data the user supplies: instance annotations, a synonyms list, the images."""
    import json

    try:
        truth, vocabulary = load_coco_ground_truth(annotations, synonyms)
    except (OSError, ValueError, KeyError) as exc:
        raise CsrError(f"cannot read CHAIR ground truth: {exc}") from exc
    files = {img["id"]: img["file_name"] for img in json.loads(annotations.read_text()).get("images", [])}
    ids = sorted(files)[:limit] if limit else sorted(files)
    paths = []
    for image_id in ids:
        path = resolve_image(images_dir, files[image_id])
        if isinstance(path, str):
            raise CsrError(f"{annotations.name}: {path}")
        if not path.is_file():
            raise CsrError(f"image {files[image_id]!r} of the annotations is not in {images_dir}")
        paths.append(path)
    return evaluate(
        engine, version, f"chair:{annotations.name}", paths, [prompt] * len(ids), [truth[i] for i in ids], vocabulary
    )
