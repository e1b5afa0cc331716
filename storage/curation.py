"""Curation: per prompt, the best and worst final responses become a pair.

A candidate with empty text is the end-of-response step of the search (EOS
right after a sentence): it ends the path but is no sentence, so it adds no
reward and no text. Everything is one SQL selection over the candidates table, recomputed from
the raw scores stored with every candidate (R_T as probability with its
log-prob sum and token count, R_I as the raw CLIP score), so a pair set under
another preset or lambda is a re-curation, never a re-generation.
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

# Sentence reward R(s) = lambda * image score + (1 - lambda) * text score.
_PAPER_SENTENCE = ":lam * c.r_i + (1 - :lam) * c.r_t"
# Released code: both scores become ranks among the siblings of one parent
# (best 1/n ... worst 1); stored as 1 - rank so that larger is better as in the
# paper preset (engine/rewards.py). Ties keep sibling order.
_RANK = "(1 - ROW_NUMBER() OVER (sib ORDER BY {score} DESC, c.sibling_index) * 1.0 / COUNT(*) OVER sib)"
_REFERENCE_SENTENCE = (
    f":lam * {_RANK.format(score='c.r_i')} + (1 - :lam) * {_RANK.format(score='d.path_norm')}"
)

_SELECTION = """
WITH RECURSIVE
down(id, prompt_id, node, path_norm) AS (
    SELECT id, prompt_id, node, logprob_sum / CASE WHEN token_count > 0 THEN token_count ELSE 1 END
    FROM candidates
    WHERE iteration = :iteration AND parent_node IS NULL AND exclusion_reason IS NULL
    UNION ALL
    SELECT c.id, c.prompt_id, c.node,
           d.path_norm + c.logprob_sum / CASE WHEN c.token_count > 0 THEN c.token_count ELSE 1 END
    FROM candidates c JOIN down d ON c.prompt_id = d.prompt_id AND c.parent_node = d.node
    WHERE c.iteration = :iteration AND c.exclusion_reason IS NULL
),
scored AS (
    SELECT c.id, c.prompt_id, c.node, c.parent_node, c.sibling_index, c.text, c.is_final,
           CASE WHEN TRIM(c.text) = '' THEN 0 ELSE {sentence_reward} END AS rs,
           CASE WHEN TRIM(c.text) = '' THEN 0 ELSE 1 END AS sentences
    FROM candidates c JOIN down d ON d.id = c.id
    WINDOW sib AS (PARTITION BY c.prompt_id, c.parent_node)
),
up(leaf_id, prompt_id, parent_node, total, n, response) AS (
    SELECT id, prompt_id, parent_node, rs, sentences, TRIM(text) FROM scored WHERE is_final
    UNION ALL
    SELECT up.leaf_id, up.prompt_id, s.parent_node, up.total + s.rs, up.n + s.sentences,
           CASE WHEN up.response = '' THEN TRIM(s.text) ELSE TRIM(s.text) || ' ' || up.response END
    FROM up JOIN scored s ON s.prompt_id = up.prompt_id AND s.node = up.parent_node
),
responses AS (
    SELECT leaf_id, prompt_id, {response_score} AS score, response
    FROM up WHERE parent_node IS NULL
),
best AS (
    SELECT leaf_id, prompt_id, score, response,
           ROW_NUMBER() OVER (PARTITION BY prompt_id ORDER BY score DESC, leaf_id) AS position
    FROM responses
),
worst AS (
    SELECT r.leaf_id, r.prompt_id, r.score, r.response,
           ROW_NUMBER() OVER (PARTITION BY r.prompt_id ORDER BY r.score, r.leaf_id) AS position
    FROM responses r JOIN best b ON b.prompt_id = r.prompt_id AND b.position = 1
    WHERE r.response <> b.response
)
SELECT b.prompt_id, b.leaf_id AS chosen_candidate_id, w.leaf_id AS rejected_candidate_id,
       b.response AS chosen_text, w.response AS rejected_text,
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
    sentence = _PAPER_SENTENCE if preset == "paper" else _REFERENCE_SENTENCE
    response = "total" if preset == "paper" else "total * 1.0 / CASE WHEN n > 0 THEN n ELSE 1 END"
    return _SELECTION.format(sentence_reward=sentence, response_score=response).strip()


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
    existing = conn.execute(
        select(PairSet).where(PairSet.iteration == iteration, PairSet.name == name)
    ).first()
    rows = select_pairs(conn, iteration, policy)
    digest = pairs_hash(rows)
    if existing is not None:
        if existing.params != policy.params():
            raise StoreError(
                f"pair set {name!r} of iteration {iteration} exists with other parameters "
                f"({existing.params}); choose another --name"
            )
        if existing.result_hash != digest:
            raise StoreError(
                f"pair set {name!r} of iteration {iteration} exists, but the candidates now select "
                "other pairs (generation went on since); curate under a new --name"
            )
        if make_default and not existing.is_default:
            _set_default(conn, iteration, existing.id)
        return CurationResult(existing.id, name, len(rows), digest, False, make_default or existing.is_default)
    has_default = conn.execute(
        select(func.count()).select_from(PairSet).where(PairSet.iteration == iteration, PairSet.is_default)
    ).scalar_one()
    pair_set_id = conn.execute(
        insert(PairSet)
        .values(
            iteration=iteration,
            name=name,
            preset=policy.preset,
            params=policy.params(),
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
    return CurationResult(pair_set_id, name, len(rows), digest, True, is_default)


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
       p.chosen_candidate_id, p.rejected_candidate_id
FROM pairs p
JOIN prompts pr ON pr.id = p.prompt_id
JOIN images i ON i.id = pr.image_id
WHERE p.pair_set_id = :pair_set_id
ORDER BY p.prompt_id
""".strip()


def training_rows(conn: Connection, pair_set_id: int) -> list[dict]:
    return [dict(r) for r in conn.execute(text(TRAINING_SELECTION), {"pair_set_id": pair_set_id}).mappings()]
