"""`csr prompts import`: validate a whole prompt file, then write it in one transaction."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from csr.engine.errors import CsrError
from csr.engine.io.prompt_files import (
    ImageInfo,
    Problem,
    PromptRecord,
    inspect_images,
    parse_prompt_file,
    resolve_image,
)
from csr.storage import ImportRejected, Store, WriteConflict


@dataclass
class ImportReport:
    added: int = 0
    already_present: int = 0
    new_images: int = 0
    skipped: list[Problem] = field(default_factory=list)


def import_prompts(
    store: Store,
    file: Path,
    images_dir: Path,
    *,
    image_prefix: str = "",
    skip_bad: bool = False,
    on_step: Callable[[str, int, int], None] | None = None,
) -> ImportReport:
    """`on_step(stage, done, total)` reports progress: "records" read, "images"
    hashed, prompts "written" (done 0 when the write starts)."""
    step = on_step or (lambda stage, done, total: None)
    if not images_dir.is_dir():
        raise CsrError(f"images directory not found: {images_dir}")
    parsed = parse_prompt_file(file)
    step("records", len(parsed.records), len(parsed.records))
    problems = list(parsed.problems)
    records, infos = _with_images(parsed.records, images_dir, image_prefix, problems, step)

    report = ImportReport()
    existing = store.existing_prompts([r.external_id for r in records])
    seen: dict[str, tuple[tuple[str, str], int]] = {}  # id -> (content, position) in this file
    to_add: list[tuple[PromptRecord, ImageInfo]] = []
    for record, info in zip(records, infos, strict=True):
        content = (info.sha256, record.text)
        in_store = existing.get(record.external_id)
        in_file = seen.get(record.external_id)
        earlier = in_store if in_store is not None else (in_file[0] if in_file else None)
        if earlier is None:
            seen[record.external_id] = (content, record.position)
            to_add.append((record, info))
        elif earlier == content:
            report.already_present += 1
        elif in_store is not None:
            problems.append(
                Problem(record.position, f"id {record.external_id!r} already exists in the store with different content")
            )
        else:
            problems.append(
                Problem(record.position, f"id {record.external_id!r} repeats record {in_file[1]} with different content")
            )
    problems.sort(key=lambda p: p.position)
    if problems and not skip_bad:
        more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
        raise ImportRejected(f"{file}: {problems[0]}{more}; nothing imported (use --skip-bad to import the rest)")
    if problems and not to_add and not report.already_present:
        # --skip-bad with nothing good left is a wrong file, not an import of nothing.
        raise ImportRejected(
            f"{file}: every record is bad ({len(problems)} problem(s), the first: {problems[0]}); nothing imported"
        )
    report.skipped = problems
    step("written", 0, len(to_add))
    try:
        report.new_images = store.add_prompts(
            [info.row(images_dir) for _, info in to_add],
            [{"external_id": r.external_id, "image_sha256": info.sha256, "text": r.text, "source": file.name}
             for r, info in to_add],
        )
    except WriteConflict as exc:
        # Another import committed the same ids between our read and our write
        # (the ids are unique): the write is rolled back as a whole.
        raise ImportRejected(
            f"{file}: another import wrote some of these prompts or images at the same time; "
            "nothing imported, run the import again"
        ) from exc
    report.added = len(to_add)
    step("written", len(to_add), len(to_add))
    return report


def _with_images(
    records: list[PromptRecord], images_dir: Path, prefix: str, problems: list[Problem],
    step: Callable[[str, int, int], None],
) -> tuple[list[PromptRecord], list[ImageInfo]]:
    located: list[tuple[PromptRecord, Path]] = []
    for record in records:
        resolved = resolve_image(images_dir, record.image, prefix)
        if isinstance(resolved, str):
            problems.append(Problem(record.position, resolved))
        else:
            located.append((record, resolved))
    # Many prompts share one image (LLaVA has several questions per COCO image).
    unique_paths = sorted({path for _, path in located})
    hashed = inspect_images(unique_paths, images_dir, lambda done: step("images", done, len(unique_paths)))
    by_path = dict(zip(unique_paths, hashed, strict=True))
    good_records, infos = [], []
    for record, path in located:
        info = by_path[path]
        if isinstance(info, str):
            problems.append(Problem(record.position, info))
        else:
            good_records.append(record)
            infos.append(info)
    return good_records, infos
