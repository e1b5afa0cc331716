"""POPE (Li et al. 2023, "Evaluating Object Hallucination in Large
Vision-Language Models"): yes/no questions "Is there a {object} in the image?"
about objects that are present and objects that are not.

Built as the reference code builds it (github.com/RUCAIBox/POPE, main.py and
utils.py): only images with at least `n_present` (3) objects qualify, `n_images`
(500) of them are sampled; for each, its first `n_present` listed objects are
asked about (an image given as a set, which lists nothing, has them drawn by
the seed), each followed by one absent object drawn by the setting:

- random: any object of the sampled images' objects;
- popular: the most frequent objects over the sampled images first;
- adversarial: the objects that co-occur most often with that present object first.

An absent object is never one of the image's objects nor one already asked
about for that image. Object frequency and co-occurrence are counted over the
sampled images, as in the reference. Everything random comes from one seed.
Where csr departs from the reference, and why: docs/evaluation.md, "POPE".
"""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

SETTINGS = ("random", "popular", "adversarial")
TEMPLATE = "Is there a {} in the image?"  # POPE main.py --template default
N_PRESENT = 3  # POPE main.py --sample_num default
N_IMAGES = 500  # POPE main.py --img_num default


@dataclass(frozen=True)
class Question:
    setting: str
    image: str  # the image's key: a file name, or a scene id
    text: str
    label: str  # "yes" or "no"
    object: str | None = None  # None for questions read from a file


def question_text(obj: str, template: str = TEMPLATE) -> str:
    # The reference writes "an" before a vowel by replacing the template's "a".
    if obj[:1].lower() in "aeiou":
        template = template.replace(" a {}", " an {}")
    return template.format(obj)


def sample_images(
    objects_by_image: Mapping[str, Iterable[str]], seed: int, n_images: int = N_IMAGES,
    n_present: int = N_PRESENT,
) -> list[str]:
    """Keys of the images POPE asks about: up to `n_images` of those with at
    least `n_present` objects, in key order, chosen by `seed`."""
    eligible = sorted(key for key, objs in objects_by_image.items() if len(set(objs)) >= n_present)
    if not eligible:
        raise ValueError(f"no image has {n_present} or more annotated objects")
    rng = random.Random(f"csr-pope-images|{seed}")
    chosen = eligible if len(eligible) <= n_images else rng.sample(eligible, n_images)
    return sorted(chosen)


def build_questions(
    objects_by_image: Mapping[str, Iterable[str]],
    setting: str,
    seed: int,
    images: Sequence[str] | None = None,
    n_present: int = N_PRESENT,
    template: str = TEMPLATE,
) -> list[Question]:
    """POPE questions of one setting for `images` (default: sample_images)."""
    if setting not in SETTINGS:
        raise ValueError(f"unknown POPE setting {setting!r}; choose one of {', '.join(SETTINGS)}")
    if images is None:
        images = sample_images(objects_by_image, seed, n_present=n_present)
    present = {key: _listed(objects_by_image[key]) for key in images}
    frequency = Counter(obj for objs in present.values() for obj in objs)
    pool = sorted(frequency)
    # Most frequent first; ties by name so that the order never depends on hashing.
    popular = sorted(pool, key=lambda o: (-frequency[o], o))
    co_occurrence: dict[str, Counter] = {obj: Counter() for obj in pool}
    for objs in present.values():
        for obj in objs:
            co_occurrence[obj].update(other for other in objs if other != obj)
    rng = random.Random(f"csr-pope|{seed}|{setting}")
    questions: list[Question] = []
    for key in images:
        objs = present[key]
        if len(pool) - len(objs) < n_present:
            raise ValueError(f"image {key}: fewer than {n_present} absent objects to ask about")
        asked: set[str] = set()
        # The reference asks about image["objects"][:3], the first listed.
        first = objs[:n_present] if _is_listed(objects_by_image[key]) else rng.sample(objs, n_present)
        for obj in first:
            asked.add(obj)
            questions.append(Question(setting, key, question_text(obj, template), "yes", obj))
            if setting == "random":
                ranked: list[str] = []
            elif setting == "popular":
                ranked = popular
            else:
                ranked = sorted(co_occurrence[obj], key=lambda o: (-co_occurrence[obj][o], o))
            absent = next((o for o in ranked if o not in asked and o not in objs), None)
            if absent is None:  # random, or the ranking ran out: the reference draws at random
                absent = rng.choice([o for o in pool if o not in asked and o not in objs])
            asked.add(absent)
            questions.append(Question(setting, key, question_text(absent, template), "no", absent))
    return questions


def _is_listed(objects: Iterable[str]) -> bool:
    return not isinstance(objects, (set, frozenset))


def _listed(objects: Iterable[str]) -> list[str]:
    """An image's objects in the order listed, each once; a set in name order."""
    if not _is_listed(objects):
        return sorted(objects)
    return list(dict.fromkeys(objects))


def read_question_file(path: Path, setting: str | None = None) -> list[Question]:
    """A ready-made POPE file in the published JSONL layout: one object per
    line with "image", "text" and "label" ("yes"/"no"). The setting defaults to
    the one the file name names (coco_pope_popular.json -> popular), else the
    file's stem."""
    path = Path(path)
    if setting is None:
        setting = next((s for s in SETTINGS if s in path.stem), path.stem)
    questions = []
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: cannot read ({exc})") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            image, text, label = record["image"], record["text"], record["label"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ValueError(f"{path}:{number}: not a POPE question (image, text, label): {exc}") from None
        if label not in ("yes", "no") or not isinstance(image, str) or not isinstance(text, str):
            raise ValueError(f"{path}:{number}: label must be \"yes\" or \"no\", image and text strings")
        questions.append(Question(setting, image, text, label))
    if not questions:
        raise ValueError(f"{path}: holds no questions")
    return questions


ANSWER_RULE = "POPE evaluate.py"  # recorded with each evaluation: how answers were read
_NO_WORDS = {"No", "no", "not"}  # the reference's negative words, case as it checks them
_YES_WORDS = {"Yes", "yes"}


def _reference_words(text: str) -> list[str]:
    # evaluate.py: the first sentence, commas removed, split on single spaces
    # (so "No!" is one word, and not the word "No").
    if text.find(".") != -1:
        text = text.split(".")[0]
    return text.replace(",", "").split(" ")


def parse_answer(text: str) -> str:
    """"yes" or "no", as the reference evaluate.py reads an answer: "no" when
    its first sentence has the word "No", "no" or "not", else "yes"."""
    return "no" if any(w in _NO_WORDS for w in _reference_words(text)) else "yes"


def says_neither(text: str) -> bool:
    """An answer with neither a yes nor a no word, in the reference's reading
    ("There is a dog.", "No!", ""): the reference counts it as "yes"; csr
    counts it the same way and reports how many there were (`unparsed`)."""
    return not any(w in _NO_WORDS or w in _YES_WORDS for w in _reference_words(text))


@dataclass(frozen=True)
class PopeScores:
    n: int
    tp: int
    fp: int
    tn: int
    fn: int
    unparsed: int  # answers with neither a yes nor a no word (counted as "yes", as the reference does)

    @property
    def accuracy(self) -> float:
        return (self.tp + self.tn) / self.n if self.n else 0.0

    @property
    def precision(self) -> float:
        # The reference divides by zero when nothing is answered "yes"; 0 here.
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else 0.0

    @property
    def recall(self) -> float:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else 0.0

    @property
    def f1(self) -> float:
        p, r = self.precision, self.recall
        return 2 * p * r / (p + r) if p + r else 0.0

    @property
    def yes_ratio(self) -> float:
        return (self.tp + self.fp) / self.n if self.n else 0.0

    def summary(self) -> dict[str, float | int]:
        return {
            "accuracy": self.accuracy, "precision": self.precision, "recall": self.recall,
            "f1": self.f1, "yes_ratio": self.yes_ratio, "n": self.n, "tp": self.tp, "fp": self.fp,
            "tn": self.tn, "fn": self.fn, "unparsed": self.unparsed,
        }


def score(labels: Sequence[str], answers: Sequence[str], unparsed: int = 0) -> PopeScores:
    """Confusion counts of parsed answers ("yes"/"no") against labels;
    `unparsed` of them said neither (says_neither) and are reported apart."""
    if len(labels) != len(answers):
        raise ValueError(f"{len(labels)} labels but {len(answers)} answers")
    tp = fp = tn = fn = 0
    for label, answer in zip(labels, answers, strict=True):
        said_yes = answer == "yes"
        if label == "yes":
            tp, fn = tp + said_yes, fn + (not said_yes)
        else:
            fp, tn = fp + said_yes, tn + (not said_yes)
    return PopeScores(len(labels), tp, fp, tn, fn, unparsed)
