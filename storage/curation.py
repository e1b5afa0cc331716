"""Curation: per prompt, the best and worst final responses become a pair.

One flat SQL selection over the `responses` table: the search stores, per
final response, its exact text and the sums of its sentences' raw scores and
sibling ranks, and the response score is a linear formula of those sums
(engine/rewards.py: response_score, which this SQL restates and a test checks
it against). A pair set under another preset or lambda is therefore a
re-curation, never a re-generation; the pair set records when it re-curates
a tree that was grown under other settings.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from sqlalchemy import Connection, func, insert, select, text, update

from csr.storage.clock import utcnow
from csr.storage.errors import OrderError, StoreError
from csr.storage.models import Pair, PairSet
from csr.storage.work import get_iteration

PRESETS = ("paper", "reference-code")

# engine/rewards.py response_score: paper = sum of R(s) = lam * sum R_I + (1 - lam) * sum R_T;
# reference-code = minus the released key, (lam * image ranks + (1 - lam) * text ranks - n) / (n + 1).
_RESPONSE_SCORE = {
    "paper": ":lam * r.r_i_sum + (1 - :lam) * r.r_t_sum",
    "reference-code": (
        "(:lam * r.image_rank_sum + (1 - :lam) * r.text_rank_sum - r.sentence_count) * 1.0"
        " / (r.sentence_count + 1)"
    ),
}

_SELECTION = """
WITH scored AS (
    SELECT r.prompt_id, r.leaf_candidate_id, r.text, {response_score} AS score
    FROM responses r
    WHERE r.iteration = :iteration
),
best AS (
    SELECT prompt_id, leaf_candidate_id, text, score,
           ROW_NUMBER() OVER (PARTITION BY prompt_id ORDER BY score DESC, leaf_candidate_id) AS position
    FROM scored
),
worst AS (
    SELECT s.prompt_id, s.leaf_candidate_id, s.text, s.score,
           ROW_NUMBER() OVER (PARTITION BY s.prompt_id ORDER BY s.score, s.leaf_candidate_id) AS position
    FROM scored s JOIN best b ON b.prompt_id = s.prompt_id AND b.position = 1
    WHERE s.text <> b.text
)
SELECT b.prompt_id, b.leaf_candidate_id AS chosen_candidate_id, w.leaf_candidate_id AS rejected_candidate_id,
       b.text AS chosen_text, w.text AS rejected_text,
       b.score AS chosen_reward, w.score AS rejected_reward, b.score - w.score AS margin
FROM best b JOIN worst w ON w.prompt_id = b.prompt_id AND w.position = 1
WHERE b.position = 1 AND b.score - w.score >= :min_margin
ORDER BY b.prompt_id
"""


@dataclass(frozen=True)
class CurationPolicy:
    preset: str = "paper"
    lam: float = 0.9
    min_margin: float = 0.0

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise StoreError(f"unknown preset {self.preset!r}; choose one of {', '.join(PRESETS)}")
        if not 0.0 <= self.lam <= 1.0:
            raise StoreError(f"lambda must lie in [0, 1], got {self.lam}")

    def default_name(self) -> str:
        return f"{self.preset}-lambda{self.lam:g}-margin{self.min_margin:g}"

    def params(self) -> dict:
        return {"preset": self.preset, "lambda": self.lam, "min_margin": self.min_margin}


def selection_sql(preset: str) -> str:
    return _SELECTION.format(response_score=_RESPONSE_SCORE[preset]).strip()


def select_pairs(conn: Connection, iteration: int, policy: CurationPolicy) -> list[dict]:
    rows = conn.execute(
        text(selection_sql(policy.preset)),
        {"iteration": iteration, "lam": policy.lam, "min_margin": policy.min_margin},
    ).mappings()
    return [dict(row) for row in rows]


def pairs_hash(rows: list[dict]) -> str:
    """A digest of a selection's result; floats at 12 significant digits so that
    SQLite and PostgreSQL arithmetic agree."""
    digest = hashlib.sha256()
    for row in rows:
        digest.update(
            json.dumps(
                [
                    row["prompt_id"],
                    row["chosen_candidate_id"],
                    row["rejected_candidate_id"],
                    row["chosen_text"],
                    row["rejected_text"],
                    f"{row['chosen_reward']:.12g}",
                    f"{row['rejected_reward']:.12g}",
                ]
            ).encode()
        )
    return digest.hexdigest()


@dataclass(frozen=True)
class CurationResult:
    pair_set_id: int
    name: str
    pairs: int
    result_hash: str
    created: bool
    is_default: bool
    note: str | None = None


def curate(
    conn: Connection,
    iteration: int,
    policy: CurationPolicy,
    name: str | None = None,
    make_default: bool = False,
) -> CurationResult:
    """Create (or confirm) a named pair set for the iteration."""
    it = get_iteration(conn, iteration)
    if it is None:
        raise OrderError(f"iteration {iteration} has not been generated: run `csr generate --iter {iteration}`")
    name = name or policy.default_name()
    params = {**policy.params(), **_provenance(it, policy)}
    existing = conn.execute(
        select(PairSet).where(PairSet.iteration == iteration, PairSet.name == name)
    ).first()
    rows = select_pairs(conn, iteration, policy)
    digest = pairs_hash(rows)
    if existing is not None:
        if existing.params != params:
            raise StoreError(
                f"pair set {name!r} of iteration {iteration} exists with other parameters "
                f"({existing.params}); choose another --name"
            )
        if existing.result_hash != digest:
            raise StoreError(
                f"pair set {name!r} of iteration {iteration} exists, but the candidates now select "
                "other pairs (generation went on since); curate under a new --pair-set"
            )
        if make_default and not existing.is_default:
            _set_default(conn, iteration, existing.id)
        return CurationResult(
            existing.id, name, len(rows), digest, False, make_default or existing.is_default, recuration_note(params)
        )
    has_default = conn.execute(
        select(func.count()).select_from(PairSet).where(PairSet.iteration == iteration, PairSet.is_default)
    ).scalar_one()
    pair_set_id = conn.execute(
        insert(PairSet)
        .values(
            iteration=iteration,
            name=name,
            preset=policy.preset,
            params=params,
            selection_sql=selection_sql(policy.preset),
            result_hash=digest,
            is_default=False,
            created_at=utcnow(),
        )
        .returning(PairSet.id)
    ).scalar_one()
    if rows:
        conn.execute(insert(Pair), [{"pair_set_id": pair_set_id, **row} for row in rows])
    is_default = make_default or not has_default
    if is_default:
        _set_default(conn, iteration, pair_set_id)
    return CurationResult(pair_set_id, name, len(rows), digest, True, is_default, recuration_note(params))


def _provenance(it, policy: CurationPolicy) -> dict:
    """Whether the pair set re-curates a tree grown under other settings: the
    active set of every search step was chosen by the iteration's own preset
    and lambda, so another lambda here is not the paper's table 2 ablation
    (that needs a regeneration, as `csr demo`'s ablation does)."""
    grown = {"preset": it.preset, "lambda": float(it.config.get("search", {}).get("lam", 0.9))}
    same = grown["preset"] == policy.preset and grown["lambda"] == policy.lam
    return {"grown_under": grown, "recurated": not same}


def recuration_note(params: dict) -> str | None:
    """A line for the user when a pair set re-curates another setting's tree."""
    if not params.get("recurated"):
        return None
    grown = params.get("grown_under", {})
    return (
        f"re-curated, not regenerated: the tree was grown under preset {grown.get('preset')} "
        f"with lambda {grown.get('lambda'):g}"
    )


def _set_default(conn: Connection, iteration: int, pair_set_id: int) -> None:
    conn.execute(update(PairSet).where(PairSet.iteration == iteration).values(is_default=PairSet.id == pair_set_id))


def pair_set(conn: Connection, iteration: int, name: str | None = None):
    """The named pair set of an iteration, or its default one."""
    query = select(PairSet).where(PairSet.iteration == iteration)
    query = query.where(PairSet.name == name) if name else query.where(PairSet.is_default)
    return conn.execute(query).first()


# The trainer's one query: its text is stored with the training run, with a hash of its result.
TRAINING_SELECTION = """
SELECT p.prompt_id, pr.external_id, pr.text AS prompt, i.root AS image_root, i.rel_path AS image_path,
       p.chosen_text, p.rejected_text, p.chosen_reward, p.rejected_reward,
       p.chosen_candidate_id, p.rejected_candidate_id,
       rc.token_ids AS chosen_token_ids, rr.token_ids AS rejected_token_ids,
       rc.token_count AS chosen_token_count, rr.token_count AS rejected_token_count,
       rc.logprob_sum AS chosen_logprob_sum, rr.logprob_sum AS rejected_logprob_sum,
       rc.sentence_count AS chosen_sentences, rr.sentence_count AS rejected_sentences,
       rc.r_t_sum AS chosen_r_t_sum, rr.r_t_sum AS rejected_r_t_sum,
       rc.r_i_sum AS chosen_r_i_sum, rr.r_i_sum AS rejected_r_i_sum,
       rc.is_truncated AS chosen_truncated, rr.is_truncated AS rejected_truncated
FROM pairs p
JOIN prompts pr ON pr.id = p.prompt_id
JOIN images i ON i.id = pr.image_id
JOIN responses rc ON rc.leaf_candidate_id = p.chosen_candidate_id
JOIN responses rr ON rr.leaf_candidate_id = p.rejected_candidate_id
WHERE p.pair_set_id = :pair_set_id
ORDER BY p.prompt_id
""".strip()


def training_rows(conn: Connection, pair_set_id: int) -> list[dict]:
    """The pairs of a pair set with their prompt, image and both responses'
    token ids (JSON decoded; None for rows rebuilt from pre-0003 stores)."""
    rows = []
    for r in conn.execute(text(TRAINING_SELECTION), {"pair_set_id": pair_set_id}).mappings():
        row = dict(r)
        for key in ("chosen_token_ids", "rejected_token_ids"):
            if isinstance(row[key], str):  # a JSON column read through text() is not decoded
                row[key] = json.loads(row[key])
        for key in ("chosen_truncated", "rejected_truncated"):
            row[key] = bool(row[key])
        rows.append(row)
    return rows


_PAIR_CLIP_MEANS = """
SELECT AVG(rc.r_i_sum / CASE WHEN rc.sentence_count > 0 THEN rc.sentence_count ELSE 1 END) AS chosen,
       AVG(rr.r_i_sum / CASE WHEN rr.sentence_count > 0 THEN rr.sentence_count ELSE 1 END) AS rejected
FROM pairs p
JOIN responses rc ON rc.leaf_candidate_id = p.chosen_candidate_id
JOIN responses rr ON rr.leaf_candidate_id = p.rejected_candidate_id
WHERE p.pair_set_id = :ps
"""


def pair_clip_means(conn: Connection, pair_set_id: int) -> tuple[float | None, float | None]:
    """Mean per-sentence R_I of a pair set's chosen and rejected responses (figure 5's quantity)."""
    row = conn.execute(text(_PAIR_CLIP_MEANS), {"ps": pair_set_id}).one()
    return row.chosen, row.rejected
