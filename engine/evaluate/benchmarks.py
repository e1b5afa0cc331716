"""Hallucination benchmarks of model versions: CHAIR and POPE, stored per version.

A benchmark here is a *task* (its items, ground truth, settings and data-set
hash) run against one or more model versions. Each (version, task) becomes one
row of the evaluations table; a row that already exists is reused, not
recomputed, so rerunning an evaluation adds nothing and changes nothing.

Defaults and where they come from:

- CHAIR image count 500: CSR appendix A.2 ("we randomly sampled 500 images from
  the COCO validation set").
- CHAIR prompt "Please describe this image in detail." and at most 512 new
  tokens: neither the paper nor the released code states them; these are the
  CHAIR settings of the LLaVA-1.5 hallucination work CSR compares with (OPERA's
  and VCD's CHAIR scripts, `--max_new_tokens 512`). 512 tokens hold a full
  LLaVA-1.5 detailed description, which rarely passes 300 tokens; the 64 used
  before cut them short.
- POPE: the reference's question template, 3 present objects a image and 500
  images (RUCAIBox/POPE main.py); the prompt suffix "Answer the question using
  a single word or phrase." and 128 new tokens are LLaVA-1.5's POPE evaluation
  (llava_pope_test.jsonl, model_vqa_loader.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from csr.engine.errors import CsrError
from csr.engine.evaluate import pope
from csr.engine.evaluate.chair import Vocabulary, chair, load_coco_ground_truth
from csr.engine.evaluate.intervals import N_RESAMPLES, bootstrap_interval, f1_from_counts, ratio
from csr.engine.io.prompt_files import resolve_image
from csr.storage import Store, evaluation_fingerprint

CHAIR_PROMPT = "Please describe this image in detail."
CHAIR_MAX_NEW_TOKENS = 512
CHAIR_IMAGES = 500
POPE_SUFFIX = "\nAnswer the question using a single word or phrase."
POPE_MAX_NEW_TOKENS = 128
BATCH_SIZE = 16

ImageLike = Image.Image | Path


@dataclass(frozen=True)
class ChairTask:
    """CHAIR over images with known objects: one description per image."""

    dataset: str
    keys: list[str]
    images: list[ImageLike]
    prompts: list[str]
    truths: list[frozenset[str]]
    vocabulary: Vocabulary
    max_new_tokens: int = CHAIR_MAX_NEW_TOKENS
    bootstrap_seed: int = 0
    extra_settings: dict = field(default_factory=dict)
    benchmark: str = "chair"

    @property
    def settings(self) -> dict:
        prompts = sorted(set(self.prompts))
        return {"dataset": self.dataset, "prompt": prompts[0] if len(prompts) == 1 else prompts,
                "max_new_tokens": self.max_new_tokens, "images": len(self.keys), "decoding": "greedy",
                "bootstrap": {"seed": self.bootstrap_seed, "resamples": N_RESAMPLES},
                **self.extra_settings}


@dataclass(frozen=True)
class PopeTask:
    """POPE questions over images. `answer_from` "question" asks the model
    each question; "description" (the demo world, whose captioner never
    learned to answer yes or no) answers "yes" exactly when the model's
    description of the image (the CHAIR prompt) mentions the object."""

    dataset: str
    questions: list[pope.Question]
    images: dict[str, ImageLike]
    suffix: str = POPE_SUFFIX
    max_new_tokens: int = POPE_MAX_NEW_TOKENS
    bootstrap_seed: int = 0
    answer_from: str = "question"
    describe: ChairTask | None = None  # the descriptions, for answer_from="description"
    extra_settings: dict = field(default_factory=dict)
    benchmark: str = "pope"

    @property
    def settings(self) -> dict:
        out = {"dataset": self.dataset, "answer_from": self.answer_from,
               "settings": sorted({q.setting for q in self.questions}),
               "bootstrap": {"seed": self.bootstrap_seed, "resamples": N_RESAMPLES},
               "decoding": "greedy", **self.extra_settings}
        if self.answer_from == "question":
            out |= {"suffix": self.suffix, "max_new_tokens": self.max_new_tokens, "answer_rule": pope.ANSWER_RULE}
        else:
            assert self.describe is not None
            out |= {"prompt": self.describe.settings["prompt"],
                    "max_new_tokens": self.describe.max_new_tokens}
        return out


Task = ChairTask | PopeTask


@dataclass(frozen=True)
class Outcome:
    version: int
    benchmark: str
    dataset: str
    metrics: dict
    reused: bool  # the row was already stored; nothing was generated


# ---------------------------------------------------------------- hashing ---


def _image_digest(image: ImageLike) -> str:
    if isinstance(image, Image.Image):
        rgb = image.convert("RGB")
        return hashlib.sha256(f"{rgb.size}".encode() + rgb.tobytes()).hexdigest()
    return hashlib.sha256(Path(image).read_bytes()).hexdigest()


def dataset_hash(task: Task) -> str:
    """What the figures depend on besides the model and the settings: every
    image's content, its ground truth (or questions and labels), and the
    object vocabulary."""
    digest = hashlib.sha256()
    if isinstance(task, ChairTask):
        for key, image, truth in zip(task.keys, task.images, task.truths, strict=True):
            digest.update(json.dumps([key, _image_digest(image), sorted(truth)]).encode())
        digest.update(json.dumps(sorted(map(list, task.vocabulary.phrases.items()),
                                        key=lambda x: x[0])).encode())
    else:
        for key in sorted(task.images):
            digest.update(json.dumps([key, _image_digest(task.images[key])]).encode())
        for q in task.questions:
            digest.update(json.dumps([q.setting, q.image, q.text, q.label]).encode())
        if task.describe is not None:
            digest.update(dataset_hash(task.describe).encode())
    return digest.hexdigest()


# ---------------------------------------------------------------- metrics ---


def chair_metrics(task: ChairTask, responses: Sequence[str]) -> tuple[dict, list[dict]]:
    result = chair(responses, task.truths, task.vocabulary)
    words = [len(r.split()) for r in responses]
    counts = np.array([[float(r.hallucinates), 1.0, len(r.hallucinated), len(r.mentioned)]
                       for r in result.per_response])
    metrics = {
        **result.summary(),
        "mean_words": sum(words) / len(words) if words else 0.0,
        "ci": {
            "chair_s": bootstrap_interval(counts, ratio(0, 1), task.bootstrap_seed),
            "chair_i": bootstrap_interval(counts, ratio(2, 3), task.bootstrap_seed),
        },
    }
    items = [{"image": key, "response": text, "mentioned": r.mentioned, "hallucinated": r.hallucinated}
             for key, text, r in zip(task.keys, responses, result.per_response, strict=True)]
    return metrics, items


def pope_metrics(task: PopeTask, answers: Sequence[str], parsed: Sequence[str]) -> tuple[dict, list[dict]]:
    metrics: dict = {}
    for setting in sorted({q.setting for q in task.questions}):
        idx = [i for i, q in enumerate(task.questions) if q.setting == setting]
        scores = pope.score([task.questions[i].label for i in idx], [parsed[i] for i in idx],
                            unparsed=sum(pope.says_neither(answers[i]) for i in idx))
        per_image: dict[str, list[float]] = {}
        for i in idx:
            q, yes = task.questions[i], parsed[i] == "yes"
            row = per_image.setdefault(q.image, [0.0, 0.0, 0.0])  # tp, fp, fn
            if q.label == "yes":
                row[0 if yes else 2] += 1
            elif yes:
                row[1] += 1
        counts = np.array(list(per_image.values()))
        metrics[setting] = {**scores.summary(),
                            "f1_ci": bootstrap_interval(counts, f1_from_counts(0, 1, 2), task.bootstrap_seed)}
    items = [{"setting": q.setting, "image": q.image, "question": q.text, "label": q.label,
              "answer": answer, "parsed": p}
             for q, answer, p in zip(task.questions, answers, parsed, strict=True)]
    return metrics, items


# ------------------------------------------------------------- generation ---

Generate = Callable[[Sequence[ImageLike], Sequence[str], int], list[str]]


def _pil(image: ImageLike) -> Image.Image:
    return image if isinstance(image, Image.Image) else Image.open(image).convert("RGB")


DECODERS = ("engine", "generate")


def policy_generator(path: str, device: str = "cpu", batch_size: int = BATCH_SIZE, decoder: str = "engine",
                     note: Callable[[str], None] | None = None) -> Generate:
    """Greedy, batched generation with a model version's weights.

    `decoder` "engine": the evaluation's own decoder (engine/evaluate/decode.py:
    one preallocated KV cache, finished rows replaced by the next prompts),
    whose tokens equal `generate`'s; a model it does not support falls back
    to `generate`, and `note` is told why. "generate": transformers'
    `generate`, `batch_size` prompts at a time."""
    import torch

    from csr.engine.evaluate.decode import greedy_decode, unsupported
    from csr.engine.loading import load_policy

    if decoder not in DECODERS:
        raise CsrError(f"unknown decoder {decoder!r}; choose one of {', '.join(DECODERS)}")
    policy = load_policy(path, device=device)
    policy.tokenizer.padding_side = "left"
    if decoder == "engine":
        reason = unsupported(policy.model)
        if reason is None:
            def decode(images: Sequence[ImageLike], prompts: Sequence[str], max_new_tokens: int) -> list[str]:
                found = greedy_decode(policy, images, prompts, max_new_tokens, batch_size, load_image=_pil)
                return [t.strip() for t in policy.tokenizer.batch_decode(found, skip_special_tokens=True)]

            return decode
        if note is not None:
            note(f"decoding with transformers' generate: the engine's decoder does not support {reason}")

    @torch.no_grad()
    def generate(images: Sequence[ImageLike], prompts: Sequence[str], max_new_tokens: int) -> list[str]:
        out: list[str] = []
        for start in range(0, len(images), batch_size):
            chunk = slice(start, start + batch_size)
            inputs = policy.processor(
                text=[policy.build_prompt(p) for p in prompts[chunk]],
                images=[_pil(im) for im in images[chunk]], return_tensors="pt", padding=True,
            )
            inputs = {k: (v.to(policy.device, policy.model.dtype) if v.is_floating_point() else v.to(policy.device))
                      if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
            generated = policy.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                              pad_token_id=policy.tokenizer.pad_token_id)
            new = generated[:, inputs["input_ids"].shape[1]:]
            out.extend(t.strip() for t in policy.tokenizer.batch_decode(new, skip_special_tokens=True))
        return out

    return generate


def _run_task(task: Task, generate: Generate, descriptions: dict[int, list[str]]) -> tuple[dict, list[dict]]:
    if isinstance(task, ChairTask):
        if id(task) not in descriptions:
            descriptions[id(task)] = generate(task.images, task.prompts, task.max_new_tokens)
        return chair_metrics(task, descriptions[id(task)])
    if task.answer_from == "description":
        assert task.describe is not None
        source = task.describe
        if id(source) not in descriptions:
            descriptions[id(source)] = generate(source.images, source.prompts, source.max_new_tokens)
        mentioned = {key: set(source.vocabulary.find(text))
                     for key, text in zip(source.keys, descriptions[id(source)], strict=True)}
        answers = ["yes" if q.object in mentioned[q.image] else "no" for q in task.questions]
        return pope_metrics(task, answers, answers)
    answers = generate([task.images[q.image] for q in task.questions],
                       [q.text + task.suffix for q in task.questions], task.max_new_tokens)
    return pope_metrics(task, answers, [pope.parse_answer(a) for a in answers])


# ---------------------------------------------------------------- running ---


def _has_weights(path: str) -> bool:
    """A local path must be a model directory; anything else is a hub id,
    which loading checks."""
    looks_local = os.path.isabs(path) or path.startswith((".", "~")) or Path(path).exists()
    return not looks_local or (Path(path).expanduser() / "config.json").is_file()


def check_versions(store: Store, versions: Sequence[int]) -> dict[int, str]:
    """Model version -> weights path, or CsrError naming the first missing one."""
    paths = {}
    for version in versions:
        mv = store.model_version(version)
        if mv is None:
            raise CsrError(f"no model version {version} in the store")
        if not _has_weights(mv.path):
            raise CsrError(f"model version {version} has no weights at {mv.path}")
        paths[version] = mv.path
    return paths


def evaluate_versions(
    store: Store,
    versions: Sequence[int],
    tasks: Sequence[Task],
    device: str = "cpu",
    batch_size: int = BATCH_SIZE,
    generator: Callable[[str], Generate] | None = None,
    decoder: str = "engine",
    note: Callable[[str], None] | None = None,
) -> list[Outcome]:
    """Run every task against every version (each version's model loaded
    once, its generations batched) and store one row per (version, task).
    Versions are checked before anything runs; stored rows are reused.
    `decoder` (see `policy_generator`) is not part of the stored settings:
    both decoders give the same tokens."""
    if decoder not in DECODERS:
        raise CsrError(f"unknown decoder {decoder!r}; choose one of {', '.join(DECODERS)}")
    paths = check_versions(store, versions)
    hashes = [dataset_hash(task) for task in tasks]
    outcomes: list[Outcome] = []
    for version in versions:
        generate: Generate | None = None
        descriptions: dict[int, list[str]] = {}
        for task, data_hash in zip(tasks, hashes, strict=True):
            settings = task.settings
            fingerprint = evaluation_fingerprint(task.benchmark, settings, data_hash)
            stored = store.find_evaluation(version, fingerprint)
            if stored is not None:
                outcomes.append(Outcome(version, task.benchmark, settings["dataset"], stored["metrics"], True))
                continue
            if generate is None:
                generate = (generator or (lambda p: policy_generator(p, device, batch_size, decoder, note)))(paths[version])
            metrics, items = _run_task(task, generate, descriptions)
            # As the store gives them back (tuples become lists), so a rerun returns equal results.
            metrics, items = json.loads(json.dumps(metrics)), json.loads(json.dumps(items))
            store.record_evaluation(
                model_version=version, benchmark=task.benchmark, settings=settings,
                dataset_hash=data_hash, metrics=metrics, items=items,
                n_responses=len(items),
                chair_s=metrics.get("chair_s"), chair_i=metrics.get("chair_i"),
                mean_words=metrics.get("mean_words"),
            )
            outcomes.append(Outcome(version, task.benchmark, settings["dataset"], metrics, False))
    return outcomes


# ------------------------------------------------------ tasks from files ---


def _image_path(images_dir: Path, name: str, source: str) -> Path:
    path = resolve_image(images_dir, name)
    if isinstance(path, str):
        raise CsrError(f"{source}: {path}")
    if not path.is_file():
        raise CsrError(f"image {name!r} of {source} is not in {images_dir}")
    return path


def coco_chair_task(
    annotations: Path,
    images_dir: Path,
    synonyms: Path | None = None,
    captions: Path | None = None,
    prompt: str = CHAIR_PROMPT,
    max_new_tokens: int = CHAIR_MAX_NEW_TOKENS,
    n_images: int | None = CHAIR_IMAGES,
    seed: int = 0,
) -> ChairTask:
    """CHAIR on COCO-style data: `n_images` images drawn by `seed` (all when
    None or fewer), the shipped COCO synonyms unless `synonyms` is given, and
    the objects of reference `captions` added to the truth when given."""
    try:
        truth = load_coco_ground_truth(annotations, synonyms, captions)
    except (OSError, ValueError) as exc:
        raise CsrError(f"cannot read CHAIR ground truth: {exc}") from None
    ids = sorted(truth.files)
    if n_images is not None and n_images < len(ids):
        ids = sorted(random.Random(f"csr-chair-images|{seed}").sample(ids, n_images))
    paths = [_image_path(images_dir, truth.files[i], annotations.name) for i in ids]
    return ChairTask(
        dataset=annotations.name, keys=[str(i) for i in ids], images=paths, prompts=[prompt] * len(ids),
        truths=[frozenset(truth.objects[i]) for i in ids], vocabulary=truth.vocabulary,
        max_new_tokens=max_new_tokens,
        extra_settings={"image_seed": seed, "synonyms": "coco (shipped)" if synonyms is None else synonyms.name,
                        "captions": None if captions is None else captions.name},
    )


def coco_pope_task(
    annotations: Path,
    images_dir: Path,
    settings: Sequence[str] = pope.SETTINGS,
    n_images: int = pope.N_IMAGES,
    seed: int = 0,
    suffix: str = POPE_SUFFIX,
    max_new_tokens: int = POPE_MAX_NEW_TOKENS,
) -> PopeTask:
    """POPE questions built from COCO-style instance annotations with `seed`."""
    try:
        truth = load_coco_ground_truth(annotations)
        keys = {str(i): i for i in truth.files}
        objects = {key: truth.listed[i] for key, i in keys.items()}
        chosen = pope.sample_images(objects, seed, n_images)
        questions = [q for s in settings for q in pope.build_questions(objects, s, seed, chosen)]
    except (OSError, ValueError) as exc:
        raise CsrError(f"cannot build POPE questions: {exc}") from None
    images: dict[str, ImageLike] = {
        key: _image_path(images_dir, truth.files[keys[key]], annotations.name) for key in chosen}
    return PopeTask(dataset=annotations.name, questions=questions, images=images, suffix=suffix,
                    max_new_tokens=max_new_tokens, bootstrap_seed=seed,
                    extra_settings={"question_seed": seed, "images": len(chosen)})


def pope_file_task(
    files: Sequence[Path],
    images_dir: Path,
    suffix: str = POPE_SUFFIX,
    max_new_tokens: int = POPE_MAX_NEW_TOKENS,
) -> PopeTask:
    """POPE from ready-made question files (the published JSONL layout)."""
    try:
        per_file = [pope.read_question_file(path) for path in files]
    except ValueError as exc:
        raise CsrError(str(exc)) from None
    names = [questions[0].setting for questions in per_file]
    if len(set(names)) != len(names):
        raise CsrError(f"two question files name the same setting: {', '.join(names)}")
    questions = [q for file_questions in per_file for q in file_questions]
    images: dict[str, ImageLike] = {}
    for q in questions:
        if q.image not in images:
            images[q.image] = _image_path(images_dir, q.image, "the question file")
    return PopeTask(dataset="+".join(p.name for p in files), questions=questions, images=images,
                    suffix=suffix, max_new_tokens=max_new_tokens)


# ------------------------------------------------------ recorded results ---

MEASURED_HERE = ("chair", "pope")


def record_external(store: Store, version: int, benchmark: str, metrics: dict[str, float],
                    dataset: str = "", tool: str = "") -> bool:
    """Store metrics measured outside csr (lmms-eval, VLMEvalKit) for a model
    version; False when exactly this record is already stored."""
    if not benchmark:
        raise CsrError("--benchmark must not be empty")
    if benchmark.lower() in MEASURED_HERE:
        raise CsrError(f"{benchmark} is measured by `csr eval {benchmark.lower()}`; record it under another name")
    if store.model_version(version) is None:
        raise CsrError(f"no model version {version} in the store")
    settings = {"dataset": dataset, "tool": tool, "recorded": True}
    data_hash = hashlib.sha256(f"recorded|{dataset}".encode()).hexdigest()
    stored = store.record_evaluation(model_version=version, benchmark=benchmark, settings=settings,
                                     dataset_hash=data_hash, metrics=metrics, items=None, n_responses=0)
    if stored is not None and stored != metrics:
        raise CsrError(f"model version {version} already has {benchmark} results for this data set "
                       f"and tool, with other values: {stored}")
    return stored is None
