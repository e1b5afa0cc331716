"""`csr pairs import`: preference data from elsewhere as a named pair set.

The layouts, told apart per record by their keys (a JSON list or JSONL):

- `trl`: TRL's `prompt`, `chosen`, `rejected` (strings, or conversational
  messages whose text is taken) with `image` or `images` (exactly one path);
- `llava`: LLaVA-style `conversations` (the first human turn is the prompt)
  and `image`, with `chosen` / `rejected`, or LLaVA-RLHF's `output_1`,
  `output_2` and `preference` (1 or 2);
- `rlhf-v`: RLHF-V as published (`text`: a JSON object, or its string, with
  `question`, `chosen`, `rejected`; `image_path`; `idx`), and RLAIF-V's flat
  `question`, `chosen`, `rejected`, `image_path`;
- `vlfeedback`: VLFeedback as published (`prompt`, `completions` with each
  `response` and its GPT-4V `annotations` ratings, `img_path`): the
  completion with the best mean rating is chosen, the worst rejected; a
  record whose completions all rate the same has no preference and is left
  out (counted in the report).

Image paths resolve under --images as prompt import resolves them (export a
parquet file's images there first). Validation is prompt import's: every
problem is reported with its record number and nothing is written; importing
the same pairs again under the same name adds nothing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from csr.engine.errors import CsrError
from csr.engine.io.prompt_files import (
    Problem,
    inspect_images,
    read_json_records,
    resolve_image,
    strip_image_markers,
)
from csr.storage import ImportRejected, Store, WriteConflict, pairs_digest

LAYOUTS = ("trl", "llava", "rlhf-v", "vlfeedback")
_ASPECTS = ("Helpfulness", "Visual Faithfulness", "Ethical Considerations")


class PairsRejected(ImportRejected):
    """A file with bad records: nothing was imported. `problems` has one line per record."""

    def __init__(self, message: str, problems: list[Problem]):
        super().__init__(message)
        self.problems = problems


@dataclass(frozen=True)
class PairRecord:
    position: int
    external_id: str | None
    image: str
    prompt: str
    chosen: str
    rejected: str
    layout: str


@dataclass
class PairImportReport:
    pair_set_id: int
    name: str
    pairs: int
    created: bool
    new_images: int = 0
    layouts: dict[str, int] = field(default_factory=dict)
    without_preference: list[int] = field(default_factory=list)


def import_pairs(store: Store, file: Path, images_dir: Path, name: str) -> PairImportReport:
    if not images_dir.is_dir():
        raise CsrError(f"images directory not found: {images_dir}")
    if not name.strip():
        raise CsrError("--pair-set must not be empty")
    records, problems, without = parse_pair_file(file)
    located, infos = [], []
    paths = []
    for record in records:
        resolved = resolve_image(images_dir, record.image)
        if isinstance(resolved, str):
            problems.append(Problem(record.position, resolved))
        else:
            located.append(record)
            paths.append(resolved)
    unique = sorted(set(paths))
    by_path = dict(zip(unique, inspect_images(unique, images_dir), strict=True))
    good = []
    for record, path in zip(located, paths, strict=True):
        info = by_path[path]
        if isinstance(info, str):
            problems.append(Problem(record.position, info))
        else:
            good.append(record)
            infos.append(info)
    if problems:
        problems.sort(key=lambda p: p.position)
        raise PairsRejected(f"{file}: {len(problems)} bad record(s); nothing imported", problems)
    if not good:
        raise ImportRejected(f"{file}: no preference pairs in the file; nothing imported")

    pairs = [{"position": r.position, "external_id": r.external_id, "prompt": r.prompt,
              "chosen_text": r.chosen, "rejected_text": r.rejected} for r in good]
    digest = pairs_digest(pairs, [info.sha256 for info in infos])
    layouts: dict[str, int] = {}
    for r in good:
        layouts[r.layout] = layouts.get(r.layout, 0) + 1
    origin = {"file": file.name, "path": str(file.resolve()), "images": str(images_dir.resolve()),
              "layouts": layouts, "records": len(good) + len(without), "without_preference": len(without)}
    report = PairImportReport(0, name, len(pairs), False, layouts=layouts, without_preference=without)
    existing = store.imported_pair_set(name)
    if existing is not None:
        if existing.result_hash != digest:
            raise ImportRejected(
                f"a pair set named {name!r} was imported from other pairs "
                f"({existing.origin.get('file') if existing.origin else '?'}); choose another --pair-set"
            )
        report.pair_set_id = existing.id
        return report
    rows = [{**pair, "image_sha256": info.sha256} for pair, info in zip(pairs, infos, strict=True)]
    try:
        report.pair_set_id, report.new_images = store.add_imported_pair_set(
            name, origin, {"source": "import", "layouts": layouts}, digest, [info.row(images_dir) for info in infos],
            rows)
    except WriteConflict as exc:
        raise ImportRejected(f"{file}: another import wrote a pair set {name!r} or these images at the same "
                             "time; nothing imported, run the import again") from exc
    report.created = True
    return report


def parse_pair_file(path: Path) -> tuple[list[PairRecord], list[Problem], list[int]]:
    """(records, problems, positions of records without a preference)."""
    entries = read_json_records(path, "pair")
    records, problems, without = [], [], []
    for position, item, error in entries:
        if error is None:
            try:
                record = _record(position, item)
            except _NoPreference:
                without.append(position)
                continue
            except _Bad as exc:
                error = str(exc)
        if error is not None:
            problems.append(Problem(position, error))
        else:
            records.append(record)
    return records, problems, without


class _Bad(ValueError):
    pass


class _NoPreference(Exception):
    pass


def _record(position: int, item) -> PairRecord:
    if not isinstance(item, dict):
        raise _Bad("not a JSON object")
    if "completions" in item:
        layout, (prompt, chosen, rejected), image, rid = "vlfeedback", _vlfeedback(item), item.get(
            "img_path", item.get("image")), item.get("id")
    elif "text" in item or "question" in item:
        layout, (prompt, chosen, rejected) = "rlhf-v", _rlhf_v(item)
        image, rid = item.get("image_path", item.get("image")), item.get("idx", item.get("id"))
    elif "conversations" in item:
        layout, (prompt, chosen, rejected) = "llava", _llava(item)
        image, rid = item.get("image"), item.get("id")
    elif "prompt" in item:
        layout, (prompt, chosen, rejected) = "trl", _trl(item)
        image, rid = _trl_image(item), item.get("id")
    else:
        raise _Bad("unknown layout: expected prompt/chosen/rejected (TRL), conversations (LLaVA), "
                   "text or question (RLHF-V) or completions (VLFeedback)")
    if not isinstance(image, str) or not image:
        raise _Bad("missing or invalid image path")
    prompt = strip_image_markers(_text(prompt, "prompt"))
    if not prompt:
        raise _Bad("empty prompt text")
    chosen, rejected = _text(chosen, "chosen").strip(), _text(rejected, "rejected").strip()
    if not chosen or not rejected:
        raise _Bad("empty chosen or rejected response")
    if chosen == rejected:
        raise _Bad("chosen and rejected are the same text")
    if rid is not None and (isinstance(rid, bool) or not isinstance(rid, (str, int))):
        raise _Bad("invalid id")
    return PairRecord(position, None if rid is None else str(rid), image, prompt, chosen, rejected, layout)


def _text(value, what: str) -> str:
    if not isinstance(value, str):
        raise _Bad(f"{what} is missing or not text")
    return value


def _message_text(value, role: str | None):
    """A string as it is; in conversational messages, the text of the last message of `role`."""
    if isinstance(value, list):
        messages = [m for m in value if isinstance(m, dict) and (role is None or m.get("role") == role)]
        if not messages:
            return None
        content = messages[-1].get("content")
        if isinstance(content, list):
            parts = [c.get("text") for c in content if isinstance(c, dict) and c.get("type") == "text"]
            return " ".join(p for p in parts if isinstance(p, str)) if parts else None
        return content
    return value


def _trl(item: dict):
    return (_message_text(item.get("prompt"), "user"), _message_text(item.get("chosen"), "assistant"),
            _message_text(item.get("rejected"), "assistant"))


def _trl_image(item: dict):
    if "images" in item:
        images = item["images"]
        if not isinstance(images, list) or len(images) != 1:
            raise _Bad("'images' must list exactly one image path")
        return images[0]
    return item.get("image")


def _llava(item: dict):
    turns = item["conversations"]
    prompt = None
    if isinstance(turns, list):
        prompt = next((t.get("value") for t in turns if isinstance(t, dict) and t.get("from") in ("human", "user")),
                      None)
    if "chosen" in item or "rejected" in item:
        return prompt, item.get("chosen"), item.get("rejected")
    if "preference" in item:  # LLaVA-RLHF's human preference: two outputs and which one is better
        outputs = [item.get("output_1"), item.get("output_2")]
        outputs = [o.get("value") if isinstance(o, dict) else o for o in outputs]
        preference = item["preference"]
        if preference not in (1, 2) or isinstance(preference, bool):
            raise _Bad("'preference' must be 1 or 2")
        return prompt, outputs[preference - 1], outputs[2 - preference]
    raise _Bad("no 'chosen'/'rejected', nor 'output_1'/'output_2' with 'preference'")


def _rlhf_v(item: dict):
    data = item.get("text", item)
    if isinstance(data, str):
        try:
            data = json.loads(data)
        except json.JSONDecodeError as exc:
            raise _Bad(f"'text' is not a JSON object ({exc.msg})") from exc
    if not isinstance(data, dict):
        raise _Bad("'text' is not a JSON object")
    return data.get("question"), data.get("chosen"), data.get("rejected")


def _vlfeedback(item: dict):
    completions = item["completions"]
    if not isinstance(completions, list):
        raise _Bad("'completions' is not a list")
    rated = []
    for index, completion in enumerate(completions):
        if not isinstance(completion, dict) or not isinstance(completion.get("response"), str):
            raise _Bad(f"completion {index + 1} has no response text")
        score = _mean_rating(completion.get("annotations"))
        if score is not None:
            rated.append((score, index, completion["response"]))
    if len(rated) < 2:
        raise _Bad("fewer than two completions with a numeric rating")
    best = max(rated, key=lambda r: (r[0], -r[1]))
    worst = min(rated, key=lambda r: (r[0], r[1]))
    if best[0] == worst[0]:
        raise _NoPreference
    return item.get("prompt"), best[2], worst[2]


def _mean_rating(annotations) -> float | None:
    """The mean of the numeric ratings over VLFeedback's three aspects (Silkie's score)."""
    if not isinstance(annotations, dict):
        return None
    ratings = []
    for aspect in _ASPECTS:
        rating = annotations.get(aspect, {}).get("Rating") if isinstance(annotations.get(aspect), dict) else None
        try:
            ratings.append(float(rating))
        except (TypeError, ValueError):
            continue
    return sum(ratings) / len(ratings) if ratings else None
