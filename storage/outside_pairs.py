"""Pair sets imported from elsewhere (`csr pairs import`): preference data with
no search tree behind it. Such a pair set belongs to no iteration
(`pair_sets.iteration` is NULL, `source` = 'import'); its pairs are
`outside_pairs` rows, texts only, and `origin` says which file (and hash)
they came from. The trainer reads them with OUTSIDE_TRAINING_SELECTION,
whose rows have the keys of `curation.training_rows` with no token ids and
no reference log-probs: the trainer tokenises the texts and computes the
reference itself.
"""

from __future__ import annotations

import hashlib
import json

from sqlalchemy import Connection, insert, select, text

from csr.storage.clock import utcnow
from csr.storage.errors import ImportRejected
from csr.storage.infos import PairSetInfo, row_as
from csr.storage.models import OutsidePair, PairSet
from csr.storage.prompts import add_images

SOURCE = "import"

OUTSIDE_TRAINING_SELECTION = """
SELECT NULL AS prompt_id, o.external_id, o.prompt, i.root AS image_root, i.rel_path AS image_path,
       o.chosen_text, o.rejected_text, NULL AS chosen_reward, NULL AS rejected_reward,
       NULL AS chosen_candidate_id, NULL AS rejected_candidate_id,
       NULL AS chosen_token_ids, NULL AS rejected_token_ids,
       NULL AS chosen_token_count, NULL AS rejected_token_count,
       NULL AS chosen_logprob_sum, NULL AS rejected_logprob_sum,
       o.position
FROM outside_pairs o
JOIN images i ON i.id = o.image_id
WHERE o.pair_set_id = :pair_set_id
ORDER BY o.position
""".strip()


def pairs_digest(pairs: list[dict], image_hashes: list[str]) -> str:
    """What an imported pair set holds: each pair's texts and image content."""
    digest = hashlib.sha256()
    for pair, sha in zip(pairs, image_hashes, strict=True):
        digest.update(json.dumps([pair["position"], pair["external_id"], sha, pair["prompt"],
                                  pair["chosen_text"], pair["rejected_text"]]).encode())
    return digest.hexdigest()


def imported_pair_set(conn: Connection, name: str) -> PairSetInfo | None:
    return row_as(PairSetInfo, conn.execute(select(PairSet).where(PairSet.iteration.is_(None), PairSet.name == name)).first())


def add_pair_set(conn: Connection, name: str, origin: dict, params: dict, result_hash: str,
                 images: list[dict], pairs: list[dict]) -> tuple[int, int]:
    """A new imported pair set with its pairs (each naming its image by
    `image_sha256`) and the images they need; returns (its id, new images).
    The caller has checked that the name is free."""
    if imported_pair_set(conn, name) is not None:
        raise ImportRejected(f"a pair set named {name!r} was imported already")
    ids, new_images = add_images(conn, images)
    pair_set_id = conn.execute(
        insert(PairSet).values(
            iteration=None, name=name, preset=SOURCE, params=params, selection_sql=OUTSIDE_TRAINING_SELECTION,
            result_hash=result_hash, is_default=False, created_at=utcnow(), source=SOURCE, origin=origin,
        ).returning(PairSet.id)
    ).scalar_one()
    if pairs:
        conn.execute(insert(OutsidePair), [
            {"pair_set_id": pair_set_id, "image_id": ids[p["image_sha256"]],
             **{k: v for k, v in p.items() if k != "image_sha256"}} for p in pairs])
    return pair_set_id, new_images


def training_rows(conn: Connection, pair_set_id: int) -> list[dict]:
    return [dict(r) for r in conn.execute(text(OUTSIDE_TRAINING_SELECTION), {"pair_set_id": pair_set_id})
            .mappings()]


def start_outside_iteration(conn: Connection, number: int, config: dict) -> bool:
    """Iteration `number` as one that trains on an imported pair set: method
    'outside', nothing to generate (no work items). Returns whether it was created;
    an existing iteration is kept as it is."""
    from csr.storage.errors import OrderError
    from csr.storage.hashing import json_digest
    from csr.storage.models import Iteration, ModelVersion

    if conn.execute(select(Iteration.number).where(Iteration.number == number)).first() is not None:
        return False
    if conn.execute(select(ModelVersion.version).where(ModelVersion.version == number - 1)).first() is None:
        raise OrderError(f"iteration {number} needs model version {number - 1}, which does not exist")
    conn.execute(insert(Iteration).values(
        number=number, policy_version=number - 1, preset="outside", method="outside", config=config,
        config_hash=json_digest(config), state="generated", created_at=utcnow(),
    ))
    return True
