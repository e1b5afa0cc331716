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
from dataclasses import dataclass
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
    """Surface phrase (tuple of words) -> canonical object name."""

    phrases: Mapping[tuple[str, ...], str]

    @classmethod
    def from_synonyms(cls, synonyms: Mapping[str, Iterable[str]]) -> Vocabulary:
        """`synonyms`: canonical name -> other names. The canonical name is
        always a synonym of itself; every phrase also matches with its last
        word in a plural form."""
        phrases: dict[tuple[str, ...], str] = {}
        bases: list[tuple[tuple[str, ...], str]] = []
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
        # Generated plurals never override a phrase the user named explicitly
        # ("glasses" may be its own category, not the plural of "glass").
        for base, canonical in bases:
            for plural in plurals(base[-1]):
                phrases.setdefault(base[:-1] + (plural,), canonical)
        return cls(phrases)

    @property
    def objects(self) -> frozenset[str]:
        return frozenset(self.phrases.values())

    def find(self, text: str) -> list[str]:
        """Canonical objects mentioned in `text`, in order, one per mention."""
        tokens = words(text)
        longest = max((len(p) for p in self.phrases), default=0)
        found: list[str] = []
        i = 0
        while i < len(tokens):
            for n in range(min(longest, len(tokens) - i), 0, -1):
                name = self.phrases.get(tuple(tokens[i : i + n]))
                if name is not None:
                    found.append(name)
                    i += n
                    break
            else:
                i += 1
        return found


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


def read_synonyms(path: Path) -> dict[str, list[str]]:
    """One line per category: the category name first, then its synonyms,
    comma-separated. Blank lines and lines starting with '#' are skipped."""
    table: dict[str, list[str]] = {}
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        names = [n.strip() for n in line.split(",") if n.strip()]
        if names[0] in table:
            raise ValueError(f"{path}:{number}: category {names[0]!r} listed twice")
        table[names[0]] = names[1:]
    return table


def load_coco_ground_truth(
    instances_json: Path, synonyms_file: Path
) -> tuple[dict[int, set[str]], Vocabulary]:
    """Objects per image id from COCO-style instance annotations, and the
    vocabulary of category names plus the user's synonyms.

    Every image listed in `images` gets an entry, possibly empty. A category
    with no line in the synonyms file is matched by its own name only.
    """
    data = json.loads(Path(instances_json).read_text())
    categories = {c["id"]: c["name"] for c in data.get("categories", [])}
    # Images without annotations stay in: every mention there is a hallucination.
    truth: dict[int, set[str]] = {image["id"]: set() for image in data.get("images", [])}
    for ann in data.get("annotations", []):
        try:
            truth.setdefault(ann["image_id"], set()).add(categories[ann["category_id"]])
        except KeyError:
            raise ValueError(
                f"{instances_json}: annotation {ann.get('id')} has unknown category "
                f"{ann.get('category_id')!r}"
            ) from None
    synonyms = read_synonyms(synonyms_file)
    unknown = sorted(set(synonyms) - set(categories.values()))
    if unknown:
        raise ValueError(f"{synonyms_file}: not categories of {instances_json}: {unknown}")
    table = {name: synonyms.get(name, []) for name in categories.values()}
    return truth, Vocabulary.from_synonyms(table)


def world_vocabulary(object_names: Iterable[str]) -> Vocabulary:
    """The demo world's vocabulary: each 'colour shape' name is its own phrase
    (plurals come from Vocabulary). Shape words alone are no object there."""
    return Vocabulary.from_synonyms({name: [] for name in object_names})
