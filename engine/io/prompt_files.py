"""Reading prompt files: the LLaVA instruction format (JSON list) and JSONL.

Parsing is strict and collects every problem with the record's position, so
an import can either write everything or nothing (or, with --skip-bad, the
good records and a list of what was skipped).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from csr.engine.errors import CsrError

_IMAGE_MARKER = re.compile(r"\s*<image>\s*")


@dataclass(frozen=True)
class PromptRecord:
    position: int  # 1-based record number in the file
    external_id: str
    image: str  # as written in the file
    text: str


@dataclass(frozen=True)
class ImageInfo:
    sha256: str
    rel_path: str
    size_bytes: int
    width: int
    height: int

    def row(self, images_dir: Path) -> dict:
        """The image as the store records it."""
        return {"sha256": self.sha256, "root": str(images_dir.resolve()), "rel_path": self.rel_path,
                "size_bytes": self.size_bytes, "width": self.width, "height": self.height}


@dataclass(frozen=True)
class Problem:
    position: int
    message: str

    def __str__(self) -> str:
        return f"record {self.position}: {self.message}"


@dataclass
class ParsedFile:
    records: list[PromptRecord]
    problems: list[Problem]


def strip_image_markers(text: str) -> str:
    return _IMAGE_MARKER.sub(" ", text).strip()


def read_json_records(path: Path, kind: str) -> list[tuple[int, object, str | None]]:
    """A JSON list or a JSONL file as (position, item, error) per record: the
    position is the list index or the line number (from 1), and a JSONL line
    that is not JSON is kept as its error, so the caller can report every bad
    record at once. A file that cannot be read, or a list that is not JSON,
    is one CsrError naming the `kind` of file."""
    try:
        raw = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise CsrError(f"{kind} file not found: {path}") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise CsrError(f"cannot read {kind} file {path}: {exc}") from exc
    if raw.lstrip().startswith("["):
        try:
            items = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise CsrError(f"{path}: not valid JSON: {exc}") from exc
        return [(i + 1, item, None) for i, item in enumerate(items)]
    entries: list[tuple[int, object, str | None]] = []
    for lineno, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entries.append((lineno, json.loads(line), None))
        except json.JSONDecodeError as exc:
            entries.append((lineno, None, f"not valid JSON ({exc.msg})"))
    return entries


def parse_prompt_file(path: Path) -> ParsedFile:
    entries = read_json_records(path, "prompt")
    parsed = ParsedFile(records=[], problems=[])
    for position, item, error in entries:
        if error is None:
            record, error = _record_from(position, item)
        if error is not None:
            parsed.problems.append(Problem(position, error))
        else:
            parsed.records.append(record)
    return parsed


def _record_from(position: int, item) -> tuple[PromptRecord | None, str | None]:
    if not isinstance(item, dict):
        return None, "not a JSON object"
    external_id = item.get("id")
    if not isinstance(external_id, (str, int)) or isinstance(external_id, bool) or str(external_id) == "":
        return None, "missing or invalid 'id'"
    image = item.get("image")
    if not isinstance(image, str) or not image:
        return None, "missing or invalid 'image'"
    if "prompt" in item:
        text = item["prompt"]
    elif "input" in item:
        text = item["input"]
    elif "conversations" in item:
        text = _first_human_turn(item["conversations"])
    else:
        return None, "no 'prompt', 'input' or 'conversations'"
    if not isinstance(text, str):
        return None, "prompt text is missing or not a string"
    text = strip_image_markers(text)
    if not text:
        return None, "empty prompt text"
    return PromptRecord(position, str(external_id), image, text), None


def _first_human_turn(conversations) -> str | None:
    if not isinstance(conversations, list):
        return None
    for turn in conversations:
        if isinstance(turn, dict) and turn.get("from") in ("human", "user"):
            return turn.get("value")
    return None


def resolve_image(images_dir: Path, name: str, prefix: str = "") -> Path | str:
    """The image's path under images_dir, or a message why it is not acceptable."""
    candidate = Path(name)
    if candidate.is_absolute():
        return f"image path {name!r} is absolute; paths are resolved under --images"
    if prefix and not candidate.name.startswith(prefix):
        candidate = candidate.with_name(prefix + candidate.name)
    root = images_dir.resolve()
    full = (root / candidate).resolve()
    if not full.is_relative_to(root):
        return f"image path {name!r} escapes the images directory"
    return full


def inspect_image(path: Path, root: Path) -> ImageInfo | str:
    """Hash and measure one image, or a message why it cannot be used."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return f"image not found: {path}"
    except OSError as exc:
        return f"cannot read image {path}: {exc.strerror or exc}"
    try:
        with Image.open(path) as image:
            image.verify()  # checks structure without decoding every pixel
            width, height = image.size
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        return f"unreadable image {path}: {exc}"
    return ImageInfo(
        sha256=hashlib.sha256(data).hexdigest(),
        rel_path=str(path.relative_to(root.resolve())),
        size_bytes=len(data),
        width=width,
        height=height,
    )


def inspect_images(paths: list[Path], root: Path,
                   on_done: Callable[[int], None] | None = None) -> list[ImageInfo | str]:
    """`on_done(n)` after each image, in order, for a progress display."""
    # Hashing is I/O and C code that releases the GIL: threads overlap the reads.
    found: list[ImageInfo | str] = []
    with ThreadPoolExecutor(max_workers=4) as pool:
        for info in pool.map(lambda p: inspect_image(p, root), paths):
            found.append(info)
            if on_done is not None:
                on_done(len(found))
    return found
