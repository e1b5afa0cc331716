"""Store API for images and prompts."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from sqlalchemy import Connection, insert, select

from csr.storage.clock import utcnow
from csr.storage.models import Image, Prompt

_CHUNK = 500


def _chunks(items: Sequence, size: int = _CHUNK) -> Iterable[Sequence]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def existing_prompts(conn: Connection, external_ids: Sequence[str]) -> dict[str, tuple[str, str]]:
    """external id -> (image sha256, text) for the ids already in the store."""
    found: dict[str, tuple[str, str]] = {}
    for chunk in _chunks(list(external_ids)):
        rows = conn.execute(
            select(Prompt.external_id, Image.sha256, Prompt.text)
            .join(Image, Image.id == Prompt.image_id)
            .where(Prompt.external_id.in_(chunk))
        )
        found.update({row.external_id: (row.sha256, row.text) for row in rows})
    return found


def image_ids(conn: Connection, hashes: Sequence[str]) -> dict[str, int]:
    ids: dict[str, int] = {}
    for chunk in _chunks(list(hashes)):
        rows = conn.execute(select(Image.sha256, Image.id).where(Image.sha256.in_(chunk)))
        ids.update({row.sha256: row.id for row in rows})
    return ids


def insert_images(conn: Connection, images: list[dict]) -> None:
    if images:
        conn.execute(insert(Image), images)


def insert_prompts(conn: Connection, prompts: list[dict]) -> None:
    if prompts:
        now = utcnow()
        conn.execute(insert(Prompt), [{**p, "created_at": now} for p in prompts])


def add_images(conn: Connection, images: list[dict]) -> tuple[dict[str, int], int]:
    """Insert the images (dicts with their sha256) the store does not hold yet;
    returns (sha256 -> id for every one of them, how many were new)."""
    known = image_ids(conn, sorted({image["sha256"] for image in images}))
    new = list({image["sha256"]: image for image in images if image["sha256"] not in known}.values())
    insert_images(conn, new)
    known.update(image_ids(conn, [image["sha256"] for image in new]))
    return known, len(new)


def add_prompts(conn: Connection, images: list[dict], prompts: list[dict]) -> int:
    """An import's new prompts (each naming its image by `image_sha256`) with
    the images they need, in one transaction; returns how many images were new.
    A prompt id another import wrote meanwhile fails the whole write (unique)."""
    ids, new_images = add_images(conn, images)
    insert_prompts(conn, [{**{k: v for k, v in p.items() if k != "image_sha256"}, "image_id": ids[p["image_sha256"]]}
                          for p in prompts])
    return new_images
