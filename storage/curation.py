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

from sqlalchemy import Connection, bindparam, func, insert, select, text, update

from csr.storage.clock import utcnow
from csr.storage.errors import NotGenerated, StoreError
from csr.storage.infos import PairSetInfo, row_as
from csr.storage.iterations import get_iteration
from csr.storage.models import Pair, PairSet
from csr.storage.trees import word_count

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

# Two rules choose a pair among a prompt's scored responses:
# - "distinct" (csr's): the best and the worst score, a tie going to the lower
#   candidate id, and the rejected text must differ from the chosen one;
# - "depth-first" (the release's construct.py: `sorted(dfs(tree), key)[0]` and
#   `[-1]`): the best score that comes first and the worst score that comes
#   last in the depth-first order of the tree, equal texts (and a prompt's one
#   response paired with itself) allowed.
PAIR_RULES = ("distinct", "depth-first")
PRESET_PAIR_RULE = {"paper": "distinct", "reference-code": "depth-first"}

# One pass over the iteration's responses, no self-join: the first window
# ranks each prompt's responses best first and carries the best text along,
# the second ranks them worst first among the texts that differ from it, and
# the group-by folds each prompt's two ends into its pair.
_SELECTION = """
WITH scored AS (
    SELECT r.prompt_id, r.leaf_candidate_id, r.text, {response_score} AS score
    FROM responses r
    WHERE r.iteration = :iteration
),
best_first AS (
    SELECT prompt_id, leaf_candidate_id, text, score,
           ROW_NUMBER() OVER by_score AS best_position,
           FIRST_VALUE(text) OVER by_score AS best_text
    FROM scored
    WINDOW by_score AS (PARTITION BY prompt_id ORDER BY score DESC, leaf_candidate_id)
),
worst_first AS (
    SELECT prompt_id, leaf_candidate_id, text, score, best_position, best_text,
           ROW_NUMBER() OVER (
               PARTITION BY prompt_id
               ORDER BY CASE WHEN text = best_text THEN 1 ELSE 0 END, score, leaf_candidate_id
           ) AS worst_position
    FROM best_first
),
ends AS (
    SELECT prompt_id, leaf_candidate_id, text, score, best_position = 1 AS is_best
    FROM worst_first
    WHERE best_position = 1 OR (worst_position = 1 AND text <> best_text)
),
pairs AS (
    SELECT prompt_id,
           MAX(CASE WHEN is_best THEN leaf_candidate_id END) AS chosen_candidate_id,
           MAX(CASE WHEN NOT is_best THEN leaf_candidate_id END) AS rejected_candidate_id,
           MAX(CASE WHEN is_best THEN text END) AS chosen_text,
           MAX(CASE WHEN NOT is_best THEN text END) AS rejected_text,
           MAX(CASE WHEN is_best THEN score END) AS chosen_reward,
           MAX(CASE WHEN NOT is_best THEN score END) AS rejected_reward
    FROM ends
    GROUP BY prompt_id
    HAVING COUNT(*) = 2
)
SELECT prompt_id, chosen_candidate_id, rejected_candidate_id, chosen_text, rejected_text,
       chosen_reward, rejected_reward, chosen_reward - rejected_reward AS margin
FROM pairs
WHERE chosen_reward - rejected_reward >= :min_margin
ORDER BY prompt_id
"""

# The depth-first rule: every response at a prompt's best or worst score; the
# tie among them is broken in Python by the tree's depth-first order.
_ENDS = """
WITH scored AS (
    SELECT r.prompt_id, r.leaf_candidate_id, r.text, {response_score} AS score
    FROM responses r
    WHERE r.iteration = :iteration
),
marked AS (
    SELECT prompt_id, leaf_candidate_id, text, score,
           MAX(score) OVER by_prompt AS top, MIN(score) OVER by_prompt AS bottom
    FROM scored
    WINDOW by_prompt AS (PARTITION BY prompt_id)
)
SELECT prompt_id, leaf_candidate_id, text, score, score = top AS is_top, score = bottom AS is_bottom
FROM marked
WHERE score = top OR score = bottom
ORDER BY prompt_id, leaf_candidate_id
"""
_DEPTH_FIRST_NOTE = """
-- then per prompt: chosen = the first at its best score, rejected = the last at its worst score,
-- in depth-first order of the tree (children in node order); equal texts allowed
"""

# The path of node numbers from the root down to each leaf: leaves in
# depth-first order are their paths in lexicographic order. Each step up is a
# lookup in the tree's unique node index.
_LEAF_PATHS = """
WITH RECURSIVE up(leaf_id, prompt_id, node, parent_node, depth) AS (
    SELECT c.id, c.prompt_id, c.node, c.parent_node, c.depth
    FROM candidates c
    WHERE c.id IN :leaf_ids
    UNION ALL
    SELECT up.leaf_id, c.prompt_id, c.node, c.parent_node, c.depth
    FROM up JOIN candidates c
      ON c.iteration = :iteration AND c.prompt_id = up.prompt_id AND c.node = up.parent_node
     AND c.depth < up.depth
)
SELECT leaf_id, depth, node FROM up
"""
_LEAF_CHUNK = 500


@dataclass(frozen=True)
class CurationSettings:
    preset: str = "paper"
    lam: float = 0.9
    min_margin: float = 0.0
    pair_rule: str = "distinct"

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise StoreError(f"unknown preset {self.preset!r}; choose one of {', '.join(PRESETS)}")
        if not 0.0 <= self.lam <= 1.0:
            raise StoreError(f"lambda must lie in [0, 1], got {self.lam}")
        if self.pair_rule not in PAIR_RULES:
            raise StoreError(f"unknown pair rule {self.pair_rule!r}; choose one of {', '.join(PAIR_RULES)}")

    def default_name(self) -> str:
        name = f"{self.preset}-lambda{self.lam:g}-margin{self.min_margin:g}"
        return name if self.pair_rule == PRESET_PAIR_RULE[self.preset] else f"{name}-{self.pair_rule}"

    def params(self) -> dict:
        return {"preset": self.preset, "lambda": self.lam, "min_margin": self.min_margin, "pair_rule": self.pair_rule}


def selection_sql(preset: str, pair_rule: str = "distinct") -> str:
    score = _RESPONSE_SCORE[preset]
    if pair_rule == "depth-first":
        return (_ENDS.format(response_score=score).strip() + "\n" + _DEPTH_FIRST_NOTE.strip()).strip()
    return _SELECTION.format(response_score=score).strip()


def select_pairs(conn: Connection, iteration: int, policy: CurationSettings) -> list[dict]:
    params = {"iteration": iteration, "lam": policy.lam, "min_margin": policy.min_margin}
    if policy.pair_rule == "depth-first":
        return _select_depth_first(conn, iteration, policy, params)
    rows = conn.execute(text(selection_sql(policy.preset)), params).mappings()
    return [dict(row) for row in rows]


def _select_depth_first(conn: Connection, iteration: int, policy: CurationSettings, params: dict) -> list[dict]:
    by_prompt: dict[int, tuple[list, list]] = {}
    for row in conn.execute(text(_ENDS.format(response_score=_RESPONSE_SCORE[policy.preset])), params).mappings():
        tops, bottoms = by_prompt.setdefault(row["prompt_id"], ([], []))
        if row["is_top"]:
            tops.append(row)
        if row["is_bottom"]:
            bottoms.append(row)
    tied = [r["leaf_candidate_id"] for tops, bottoms in by_prompt.values() for ends in (tops, bottoms)
            if len(ends) > 1 for r in ends]
    order = _depth_first_keys(conn, iteration, tied)
    pairs = []
    for prompt_id, (tops, bottoms) in by_prompt.items():
        chosen = min(tops, key=lambda r: order.get(r["leaf_candidate_id"], ()))
        rejected = max(bottoms, key=lambda r: order.get(r["leaf_candidate_id"], ()))
        margin = chosen["score"] - rejected["score"]
        if margin < policy.min_margin:
            continue
        pairs.append({
            "prompt_id": prompt_id,
            "chosen_candidate_id": chosen["leaf_candidate_id"],
            "rejected_candidate_id": rejected["leaf_candidate_id"],
            "chosen_text": chosen["text"],
            "rejected_text": rejected["text"],
            "chosen_reward": chosen["score"],
            "rejected_reward": rejected["score"],
            "margin": margin,
        })
    return sorted(pairs, key=lambda r: r["prompt_id"])


def _depth_first_keys(conn: Connection, iteration: int, leaf_ids: list[int]) -> dict[int, tuple[int, ...]]:
    """leaf candidate id -> its path of node numbers from the root."""
    steps: dict[int, list[tuple[int, int]]] = {}
    query = text(_LEAF_PATHS).bindparams(bindparam("leaf_ids", expanding=True))
    for start in range(0, len(leaf_ids), _LEAF_CHUNK):
        chunk = leaf_ids[start : start + _LEAF_CHUNK]
        for leaf_id, depth, node in conn.execute(query, {"leaf_ids": chunk, "iteration": iteration}).all():
            steps.setdefault(leaf_id, []).append((depth, node))
    return {leaf: tuple(node for _, node in sorted(path)) for leaf, path in steps.items()}


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


@dataclass(frozen=True)
class Selection:
    """A curation computed from a read of the store, ready to be recorded."""

    iteration: int
    policy: CurationSettings
    name: str
    params: dict
    rows: list[dict]
    result_hash: str


def compute_selection(conn: Connection, iteration: int, policy: CurationSettings, name: str | None = None) -> Selection:
    """The pairs a policy selects, computed in a read transaction (no lock held)."""
    it = get_iteration(conn, iteration)
    if it is None:
        raise NotGenerated(iteration)
    rows = select_pairs(conn, iteration, policy)
    params = {**policy.params(), **_provenance(it, policy)}
    return Selection(iteration, policy, name or policy.default_name(), params, rows, pairs_hash(rows))


def record(conn: Connection, selection: Selection, make_default: bool = False) -> CurationResult:
    """Create (or confirm) the selection's named pair set: one short write transaction."""
    policy, params = selection.policy, selection.params
    pair_set_id, created, is_default = save_pair_set(
        conn, selection.iteration, selection.name, params, selection.rows, selection.result_hash, make_default,
        values={"preset": policy.preset, "selection_sql": selection_sql(policy.preset, policy.pair_rule)},
        selected_from="candidates", recorded_params=_with_rule,
    )
    return CurationResult(pair_set_id, selection.name, len(selection.rows), selection.result_hash, created,
                          is_default, recuration_note(params))


def save_pair_set(conn: Connection, iteration: int, name: str, params: dict, rows: list[dict], digest: str,
                  make_default: bool, values: dict, selected_from: str,
                  recorded_params=lambda params: params) -> tuple[int, bool, bool]:
    """Writes a curated pair set, or confirms the one of that name when the same
    parameters select the same pairs: (its id, created, is the default).
    `recorded_params` reads an existing set's parameters as they are written
    today (a rule added since defaults to its old behaviour)."""
    existing = conn.execute(
        select(PairSet).where(PairSet.iteration == iteration, PairSet.name == name)
    ).first()
    if existing is not None:
        if recorded_params(existing.params) != params:
            raise StoreError(f"pair set {name!r} of iteration {iteration} exists with other parameters "
                             f"({existing.params}); choose another pair-set name")
        if existing.result_hash != digest:
            raise StoreError(f"pair set {name!r} of iteration {iteration} exists, but the {selected_from} now "
                             "select other pairs (generation went on since); curate under a new pair-set name")
        if make_default and not existing.is_default:
            _set_default(conn, iteration, existing.id)
        return existing.id, False, make_default or existing.is_default
    has_default = conn.execute(
        select(func.count()).select_from(PairSet).where(PairSet.iteration == iteration, PairSet.is_default)
    ).scalar_one()
    pair_set_id = conn.execute(
        insert(PairSet)
        .values(iteration=iteration, name=name, params=params, result_hash=digest, is_default=False,
                created_at=utcnow(), **values)
        .returning(PairSet.id)
    ).scalar_one()
    if rows:
        conn.execute(insert(Pair), [{"pair_set_id": pair_set_id, **row, "chosen_words": word_count(row["chosen_text"]),
                                     "rejected_words": word_count(row["rejected_text"])}
                                    for row in rows])
    is_default = make_default or not has_default
    if is_default:
        _set_default(conn, iteration, pair_set_id)
    return pair_set_id, True, is_default


def _with_rule(params: dict) -> dict:
    """Pair sets made before the pair rule was recorded used the distinct rule."""
    return {**params, "pair_rule": params.get("pair_rule", "distinct")}


def _provenance(it, policy: CurationSettings) -> dict:
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


def pair_set(conn: Connection, iteration: int, name: str | None = None) -> PairSetInfo | None:
    """The named pair set of an iteration, or its default one."""
    query = select(PairSet).where(PairSet.iteration == iteration)
    query = query.where(PairSet.name == name) if name else query.where(PairSet.is_default)
    return row_as(PairSetInfo, conn.execute(query).first())


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


# The same rows without the token ids (what a text export writes): the
# largest columns, and decoding them was a tenth of `csr export`.
_TEXT_ROWS_SELECTION = TRAINING_SELECTION.replace(
    "rc.token_ids AS chosen_token_ids, rr.token_ids AS rejected_token_ids",
    "NULL AS chosen_token_ids, NULL AS rejected_token_ids")


def training_rows(conn: Connection, pair_set_id: int, token_ids: bool = True) -> list[dict]:
    """The pairs of a pair set with their prompt, image and both responses'
    token ids (JSON decoded; None for rows rebuilt from pre-0003 stores, and
    for every row without `token_ids`)."""
    rows = []
    selection = TRAINING_SELECTION if token_ids else _TEXT_ROWS_SELECTION
    for r in conn.execute(text(selection), {"pair_set_id": pair_set_id}).mappings():
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
