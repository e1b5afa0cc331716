"""CHAIR object hallucination (Rohrbach et al. 2018), as CSR's appendix A.2 reports it.

CHAIR_S: share of responses that mention at least one object not in the image.
CHAIR_I: share of object mentions that name an object not in the image.

Objects are found in text through a `Vocabulary` of surface phrases (synonyms
and their plurals) mapped to canonical object names. Matching is on lower-cased
word sequences, longest phrase first, so "hot dog" is one object and not a dog.
Plurals are generated from the vocabulary rather than stripped from the text:
singularising arbitrary words ("glass" -> "glas", "bus" -> "bu") invents
matches, generating "buses" from "bus" cannot.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

_WORD = re.compile(r"[a-z0-9]+")

# Irregular English plurals that appear among common object names.
_IRREGULAR = {
    "person": ["people", "persons"],
    "man": ["men"],
    "woman": ["women"],
    "child": ["children"],
    "mouse": ["mice"],
    "goose": ["geese"],
    "foot": ["feet"],
    "tooth": ["teeth"],
    "sheep": ["sheep"],
    "deer": ["deer"],
    "fish": ["fish", "fishes"],
    "knife": ["knives"],
    "leaf": ["leaves"],
    "scissors": ["scissors"],
    "skis": ["skis"],
    "glasses": ["glasses"],
}


def plurals(word: str) -> list[str]:
    """Plausible plural forms of one word; extra forms are harmless because a
    form only matters if it appears in the text."""
    if word in _IRREGULAR:
        return list(_IRREGULAR[word])
    forms = [word + "s"]
    if re.search(r"(s|x|z|ch|sh)$", word):
        forms = [word + "es"]
    elif re.search(r"[^aeiou]y$", word):
        forms = [word[:-1] + "ies"]
    elif word.endswith("o"):
        forms.append(word + "es")
    elif word.endswith("fe"):
        forms.append(word[:-2] + "ves")
    elif word.endswith("f"):
        forms.append(word[:-1] + "ves")
    return forms


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


@dataclass(frozen=True)
class Vocabulary:
    """Surface phrase (tuple of words) -> canonical object name, or None for a
    compound that names no object of the vocabulary ("train track") and must
    not be read as the object its words contain."""

    phrases: Mapping[tuple[str, ...], str | None]
    # Surface phrase -> object: mentions through that phrase do not count in a
    # response that also mentions the object ("seat" beside "toilet").
    dropped_beside: Mapping[tuple[str, ...], str] = field(default_factory=dict)

    @classmethod
    def from_synonyms(
        cls,
        synonyms: Mapping[str, Iterable[str]],
        compounds: Mapping[str, str | None] | None = None,
        dropped_beside: Mapping[str, str] | None = None,
    ) -> Vocabulary:
        """`synonyms`: canonical name -> other names. The canonical name is
        always a synonym of itself; every phrase also matches with its last
        word in a plural form. `compounds`: extra phrases read as the given
        object (or as no object) whatever their words are; compounds naming an
        object outside `synonyms` are left out."""
        phrases: dict[tuple[str, ...], str | None] = {}
        bases: list[tuple[tuple[str, ...], str | None]] = []
        for canonical, others in synonyms.items():
            for synonym in [canonical, *others]:
                base = tuple(words(synonym))
                if not base:
                    continue
                owner = phrases.setdefault(base, canonical)
                if owner != canonical:
                    raise ValueError(
                        f"{synonym!r} is a synonym of both {owner!r} and {canonical!r}"
                    )
                bases.append((base, canonical))
        for compound, target in (compounds or {}).items():
            if target is not None and target not in synonyms:
                continue
            base = tuple(words(compound))
            phrases[base] = target
            bases.append((base, target))
        # Generated plurals never override a phrase the user named explicitly
        # ("glasses" may be its own category, not the plural of "glass").
        for base, canonical in bases:
            for plural in plurals(base[-1]):
                phrases.setdefault(base[:-1] + (plural,), canonical)
        dropped: dict[tuple[str, ...], str] = {}
        for phrase, beside in (dropped_beside or {}).items():
            base = tuple(words(phrase))
            for form in [base, *(base[:-1] + (p,) for p in plurals(base[-1]))]:
                dropped[form] = beside
        return cls(phrases, dropped)

    @property
    def objects(self) -> frozenset[str]:
        return frozenset(name for name in self.phrases.values() if name is not None)

    def find(self, text: str) -> list[str]:
        """Canonical objects mentioned in `text`, in order, one per mention."""
        tokens = words(text)
        longest = max((len(p) for p in self.phrases), default=0)
        found: list[tuple[tuple[str, ...], str | None]] = []
        i = 0
        while i < len(tokens):
            for n in range(min(longest, len(tokens) - i), 0, -1):
                phrase = tuple(tokens[i : i + n])
                if phrase in self.phrases:
                    found.append((phrase, self.phrases[phrase]))
                    i += n
                    break
            else:
                i += 1
        named = {name for _, name in found if name is not None}
        return [
            name
            for phrase, name in found
            if name is not None
            and not (phrase in self.dropped_beside and self.dropped_beside[phrase] in named)
        ]


@dataclass(frozen=True)
class ResponseChair:
    mentioned: list[str]  # canonical objects, one per mention
    hallucinated: list[str]  # the mentions not in the truth

    @property
    def hallucinates(self) -> bool:
        return bool(self.hallucinated)


@dataclass(frozen=True)
class ChairResult:
    chair_s: float
    chair_i: float
    n_responses: int
    n_mentions: int
    n_hallucinated: int
    # Share of true objects mentioned at least once: a model that says
    # nothing has CHAIR 0, so CHAIR alone cannot rank models.
    recall: float
    per_response: list[ResponseChair]

    def summary(self) -> dict[str, float | int]:
        return {
            "chair_s": self.chair_s,
            "chair_i": self.chair_i,
            "recall": self.recall,
            "n_responses": self.n_responses,
            "n_mentions": self.n_mentions,
            "n_hallucinated": self.n_hallucinated,
        }


def chair(
    responses: Sequence[str],
    truths: Sequence[Iterable[str]],
    vocabulary: Vocabulary,
    unique: bool = False,
) -> ChairResult:
    """CHAIR over paired responses and ground-truth object sets.

    Like the original implementation every mention counts, so a repeated
    hallucination weighs twice; `unique=True` counts each object once per response.
    Truth objects outside the vocabulary are ignored for recall.
    """
    if len(responses) != len(truths):
        raise ValueError(f"{len(responses)} responses but {len(truths)} truth sets")
    per_response = []
    n_mentions = n_hallucinated = n_truth = n_recalled = 0
    for text, truth in zip(responses, truths, strict=True):
        truth = set(truth) & vocabulary.objects
        mentioned = vocabulary.find(text)
        if unique:
            mentioned = list(dict.fromkeys(mentioned))
        hallucinated = [m for m in mentioned if m not in truth]
        per_response.append(ResponseChair(mentioned, hallucinated))
        n_mentions += len(mentioned)
        n_hallucinated += len(hallucinated)
        n_truth += len(truth)
        n_recalled += len(truth & set(mentioned))
    n = len(responses)
    return ChairResult(
        chair_s=sum(r.hallucinates for r in per_response) / n if n else 0.0,
        chair_i=n_hallucinated / n_mentions if n_mentions else 0.0,
        n_responses=n,
        n_mentions=n_mentions,
        n_hallucinated=n_hallucinated,
        recall=n_recalled / n_truth if n_truth else 0.0,
        per_response=per_response,
    )


def read_synonyms(path: Path | None = None) -> dict[str, list[str]]:
    """One line per category: the category name first, then its synonyms,
    comma-separated. Blank lines and lines starting with '#' are skipped.
    Without a path, the COCO table shipped with csr (data/coco_synonyms.txt)."""
    if path is None:
        text = resources.files("csr.engine.evaluate").joinpath("data", COCO_SYNONYMS).read_text()
        source = COCO_SYNONYMS
    else:
        text = Path(path).read_text()
        source = str(path)
    table: dict[str, list[str]] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        names = [n.strip() for n in line.split(",") if n.strip()]
        if names[0] in table:
            raise ValueError(f"{source}:{number}: category {names[0]!r} listed twice")
        table[names[0]] = [n for n in names[1:] if n != names[0]]
    return table


COCO_SYNONYMS = "coco_synonyms.txt"

# The reference CHAIR code's special cases for COCO (utils/chair.py of
# LisaAnne/Hallucination): a qualifier that is itself a synonym must not fire
# ("baby bird" is a bird, not a person; "passenger train" is no passenger), and
# some compounds name no COCO object ("train track" is not a train).
_COCO_ANIMALS = {
    "bird": "bird", "cat": "cat", "dog": "dog", "horse": "horse", "sheep": "sheep",
    "cow": "cow", "elephant": "elephant", "bear": "bear", "zebra": "zebra",
    "giraffe": "giraffe", "animal": None, "cub": None,
}
COCO_COMPOUNDS: dict[str, str | None] = {
    **{f"{age} {animal}": target for animal, target in _COCO_ANIMALS.items()
       for age in ("baby", "adult")},
    "passenger jet": "airplane",
    "passenger train": "train",
    "bow tie": "tie",
    "toilet seat": "toilet",
    "home plate": None,
    "train track": None,
}
# "the seat of the toilet" is no chair.
COCO_DROPPED_BESIDE = {"seat": "toilet"}


def coco_vocabulary(
    categories: Iterable[str] | None = None, synonyms: Mapping[str, Iterable[str]] | None = None
) -> Vocabulary:
    """The standard CHAIR vocabulary: `synonyms` (default: the shipped COCO
    table) restricted to `categories` (default: all of it), with the reference
    code's COCO special cases. A category without synonyms is matched by its
    own name only."""
    table = read_synonyms() if synonyms is None else {k: list(v) for k, v in synonyms.items()}
    if categories is not None:
        table = {name: table.get(name, []) for name in categories}
    return Vocabulary.from_synonyms(table, COCO_COMPOUNDS, COCO_DROPPED_BESIDE)


@dataclass(frozen=True)
class CocoGroundTruth:
    objects: dict[int, set[str]]  # image id -> canonical objects present
    files: dict[int, str]  # image id -> file name
    vocabulary: Vocabulary
    # image id -> its annotated objects in the order the annotations list them, each
    # once (POPE asks about the first three listed); reference captions add none.
    listed: dict[int, list[str]] = field(default_factory=dict)


def load_coco_ground_truth(
    instances_json: Path, synonyms_file: Path | None = None, captions_json: Path | None = None
) -> CocoGroundTruth:
    """Objects per image id from COCO-style instance annotations (and, as in
    the standard CHAIR, the objects its reference captions mention), and the
    vocabulary of the annotation's categories.

    Every image listed in `images` gets an entry, possibly empty. Raises
    ValueError, with the file named, on anything malformed.
    """
    data = _read_json_object(instances_json)
    try:
        categories = {c["id"]: c["name"] for c in data["categories"]}
        files = {image["id"]: image.get("file_name", "") for image in data["images"]}
        annotations = [(a["image_id"], a["category_id"], a.get("id")) for a in data["annotations"]]
    except (KeyError, TypeError) as exc:
        raise ValueError(f"{instances_json}: not COCO instances (missing {exc})") from None
    if not files:
        raise ValueError(f"{instances_json}: lists no images")
    # Images without annotations stay in: every mention there is a hallucination.
    truth: dict[int, set[str]] = {image_id: set() for image_id in files}
    listed: dict[int, dict[str, None]] = {image_id: {} for image_id in files}
    for image_id, category_id, ann_id in annotations:
        if category_id not in categories:
            raise ValueError(
                f"{instances_json}: annotation {ann_id} has unknown category {category_id!r}"
            )
        if image_id not in truth:
            raise ValueError(f"{instances_json}: annotation {ann_id} has unknown image {image_id!r}")
        truth[image_id].add(categories[category_id])
        listed[image_id][categories[category_id]] = None
    synonyms = None
    if synonyms_file is not None:
        synonyms = read_synonyms(synonyms_file)
        unknown = sorted(set(synonyms) - set(categories.values()))
        if unknown:
            raise ValueError(f"{synonyms_file}: not categories of {instances_json}: {unknown}")
    vocabulary = coco_vocabulary(categories.values(), synonyms)
    if captions_json is not None:
        captions = _read_json_object(captions_json)
        try:
            for ann in captions["annotations"]:
                if ann["image_id"] in truth:
                    truth[ann["image_id"]].update(vocabulary.find(ann["caption"]))
        except (KeyError, TypeError) as exc:
            raise ValueError(f"{captions_json}: not COCO captions (missing {exc})") from None
    return CocoGroundTruth(truth, files, vocabulary, {i: list(objs) for i, objs in listed.items()})


def _read_json_object(path: Path) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: not a JSON object")
    return data


def world_vocabulary(object_names: Iterable[str]) -> Vocabulary:
    """The demo world's vocabulary: each 'colour shape' name is its own phrase
    (plurals come from Vocabulary). Shape words alone are no object there."""
    return Vocabulary.from_synonyms({name: [] for name in object_names})
