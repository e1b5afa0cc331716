"""SQLAlchemy 2.0 models of the csr store.

Every table here is created and changed only through the Alembic revisions in
migrations/versions; `tests/test_migrations.py` checks the two agree.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    literal_column,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# SQLite only auto-increments an INTEGER PRIMARY KEY; PostgreSQL gets a real bigint.
BigId = BigInteger().with_variant(Integer(), "sqlite")


class Base(DeclarativeBase):
    pass


class Image(Base):
    __tablename__ = "images"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sha256: Mapped[str] = mapped_column(String(64), unique=True)
    root: Mapped[str] = mapped_column(Text)
    rel_path: Mapped[str] = mapped_column(Text)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)


class Prompt(Base):
    __tablename__ = "prompts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    external_id: Mapped[str] = mapped_column(String(255), unique=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id"), index=True)
    text: Mapped[str] = mapped_column(Text)
    source: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime)


class ModelVersion(Base):
    __tablename__ = "model_versions"

    version: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    parent_version: Mapped[int | None] = mapped_column(ForeignKey("model_versions.version"))
    # The iteration whose pairs trained this version; NULL for the base model.
    iteration: Mapped[int | None] = mapped_column(Integer)
    path: Mapped[str] = mapped_column(Text)
    base_model: Mapped[str] = mapped_column(Text)
    clip_model: Mapped[str] = mapped_column(Text)
    clip_pretrained: Mapped[str | None] = mapped_column(Text)
    weights_hash: Mapped[str | None] = mapped_column(String(64))
    lora_config: Mapped[dict | None] = mapped_column(JSON)
    metrics: Mapped[dict | None] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime)


class Iteration(Base):
    __tablename__ = "iterations"

    number: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    policy_version: Mapped[int] = mapped_column(ForeignKey("model_versions.version"))
    preset: Mapped[str] = mapped_column(String(32))
    # How the iteration makes pairs: csr (the calibrated search), self-reward
    # (sampled responses judged by the model), outside (an imported pair set).
    method: Mapped[str] = mapped_column(String(32), server_default="csr")
    # Every generation hyper-parameter, frozen when the iteration starts.
    config: Mapped[dict] = mapped_column(JSON)
    config_hash: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(DateTime)


class Worker(Base):
    __tablename__ = "workers"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    iteration: Mapped[int] = mapped_column(ForeignKey("iterations.number"))
    host: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    device: Mapped[str] = mapped_column(String(64))
    started_at: Mapped[datetime] = mapped_column(DateTime)
    heartbeat_at: Mapped[datetime] = mapped_column(DateTime)
    stopped_at: Mapped[datetime | None] = mapped_column(DateTime)


class WorkItem(Base):
    __tablename__ = "work_items"
    __table_args__ = (
        UniqueConstraint("iteration", "prompt_id"),
        # claim next: pending rows, or claimed rows whose lease ran out
        Index("ix_work_items_claim", "iteration", "state", "lease_expires_at"),
        # the next pending items in id order, read from the index without a sort
        Index("ix_work_items_next", "iteration", "state", "id"),
        # pending items out of attempts, found without reading every pending row
        Index("ix_work_items_attempts", "iteration", "state", "attempts"),
        # a worker's claimed items (heartbeat, release_unheld, csr status)
        Index("ix_work_items_holder", "state", "worker_id"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    iteration: Mapped[int] = mapped_column(ForeignKey("iterations.number"))
    prompt_id: Mapped[int] = mapped_column(ForeignKey("prompts.id"))
    state: Mapped[str] = mapped_column(String(16))  # pending | claimed | done | failed
    worker_id: Mapped[int | None] = mapped_column(ForeignKey("workers.id"))
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text)
    updated_at: Mapped[datetime] = mapped_column(DateTime)


class Candidate(Base):
    """One candidate sentence of one prompt's sentence-level beam search.

    `node` numbers the candidates of one (iteration, prompt) tree in the order
    they were generated; `parent_node` points into the same tree, so a whole
    tree is written with one executemany and no RETURNING round trip.
    """

    __tablename__ = "candidates"
    __table_args__ = (
        UniqueConstraint("iteration", "prompt_id", "node", name="uq_candidates_tree_node"),
        Index("ix_candidates_final", "iteration", "is_final"),
        # children of a node: the reference-code preset walks trees top-down
        Index("ix_candidates_children", "iteration", "prompt_id", "parent_node"),
        # only the excluded candidates (a few per cent): `csr stats` counts them per reason
        Index("ix_candidates_excluded", "iteration", "exclusion_reason", "is_final",
              sqlite_where=literal_column("exclusion_reason IS NOT NULL"),
              postgresql_where=literal_column("exclusion_reason IS NOT NULL")),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    iteration: Mapped[int] = mapped_column(ForeignKey("iterations.number"))
    prompt_id: Mapped[int] = mapped_column(ForeignKey("prompts.id"))
    node: Mapped[int] = mapped_column(Integer)
    parent_node: Mapped[int | None] = mapped_column(Integer)
    depth: Mapped[int] = mapped_column(Integer)
    sibling_index: Mapped[int] = mapped_column(Integer)
    text: Mapped[str] = mapped_column(Text)
    token_count: Mapped[int] = mapped_column(Integer)
    logprob_sum: Mapped[float] = mapped_column(Float)
    r_t: Mapped[float] = mapped_column(Float)
    r_i: Mapped[float] = mapped_column(Float)
    reward: Mapped[float] = mapped_column(Float)
    cumulative_reward: Mapped[float] = mapped_column(Float)
    is_final: Mapped[bool] = mapped_column(Boolean)
    is_kept: Mapped[bool] = mapped_column(Boolean)
    exclusion_reason: Mapped[str | None] = mapped_column(String(64))
    # Why the token search ended the sentence: sentence_end | eos | max_new_tokens | max_length.
    finish_reason: Mapped[str | None] = mapped_column(String(16))
    # The generated token ids of this sentence (the truth; `text` is their
    # portable decode, csr.engine.text). NULL in rows made before revision 0003.
    token_ids: Mapped[list | None] = mapped_column(JSON)
    # The diversity-penalised, length-normalised beam score the token search ranked it by.
    beam_score: Mapped[float | None] = mapped_column(Float)
    # 1 - rank among the scored siblings (NULL for end markers and excluded candidates).
    text_rank: Mapped[float | None] = mapped_column(Float)
    image_rank: Mapped[float | None] = mapped_column(Float)
    # Whether `text` is exactly what this sentence's tokens add to its parent's
    # decode (csr.engine.text): false where the decode rewrote the parent's
    # text, so the path's texts joined differ from the response's decode.
    # NULL in rows made before revision 0005.
    text_exact: Mapped[bool | None] = mapped_column(Boolean)


class Response(Base):
    """One final response of a search tree: the whole path from the root to a
    kept final candidate, with the sums every curation formula needs
    (engine/rewards.py: response_score), so curation is one flat query."""

    __tablename__ = "responses"
    __table_args__ = (
        UniqueConstraint("iteration", "prompt_id", "leaf_node", name="uq_responses_leaf"),
        Index("ix_responses_prompt", "iteration", "prompt_id"),
        # pairs name their responses by leaf candidate
        Index("ix_responses_leaf_candidate", "leaf_candidate_id", unique=True),
        # covers the per-iteration figures of `csr stats` (words, truncation) without reading texts
        Index("ix_responses_figures", "iteration", "is_truncated", "word_count"),
        # covers a pair's lookup of each response's figures (`csr stats`, the report):
        # no response row (text, token ids) is read (revision 0009)
        Index("ix_responses_pair_figures", "leaf_candidate_id", "sentence_count", "r_t_sum", "r_i_sum",
              "token_count", "word_count"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    iteration: Mapped[int] = mapped_column(ForeignKey("iterations.number"))
    prompt_id: Mapped[int] = mapped_column(ForeignKey("prompts.id"))
    leaf_node: Mapped[int] = mapped_column(Integer)
    leaf_candidate_id: Mapped[int] = mapped_column(BigId, ForeignKey("candidates.id"))
    # The portable decode of token_ids (rows the 0003 migration rebuilt: the path's texts joined).
    text: Mapped[str] = mapped_column(Text)
    token_ids: Mapped[list | None] = mapped_column(JSON)
    # False for rows the 0003 migration rebuilt from an older store's texts.
    has_token_ids: Mapped[bool] = mapped_column(Boolean)
    token_count: Mapped[int] = mapped_column(Integer)
    sentence_count: Mapped[int] = mapped_column(Integer)
    # log pi_{N-1} of the whole response: the DPO reference log-prob.
    logprob_sum: Mapped[float] = mapped_column(Float)
    r_t_sum: Mapped[float] = mapped_column(Float)
    r_i_sum: Mapped[float] = mapped_column(Float)
    text_rank_sum: Mapped[float] = mapped_column(Float)
    image_rank_sum: Mapped[float] = mapped_column(Float)
    # The response hit the search's max_length: it was cut, not ended by the model.
    is_truncated: Mapped[bool] = mapped_column(Boolean)
    # Words of `text` (runs of characters other than ASCII whitespace; trees.word_count),
    # written with the response so `csr stats` never reads the texts (revision 0008).
    word_count: Mapped[int | None] = mapped_column(Integer)


class PairSet(Base):
    __tablename__ = "pair_sets"
    __table_args__ = (UniqueConstraint("iteration", "name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    # NULL for a pair set imported from elsewhere: it belongs to no iteration.
    iteration: Mapped[int | None] = mapped_column(ForeignKey("iterations.number"))
    name: Mapped[str] = mapped_column(String(128))
    preset: Mapped[str] = mapped_column(String(32))
    params: Mapped[dict] = mapped_column(JSON)
    selection_sql: Mapped[str] = mapped_column(Text)
    result_hash: Mapped[str] = mapped_column(String(64))
    is_default: Mapped[bool] = mapped_column(Boolean)
    created_at: Mapped[datetime] = mapped_column(DateTime)
    # csr | self-reward (pairs over the iteration's responses) | import (outside_pairs rows).
    source: Mapped[str] = mapped_column(String(32), server_default="csr")
    # Where imported pairs came from: file name, its sha256, layout, image folder, records.
    origin: Mapped[dict | None] = mapped_column(JSON)


class Pair(Base):
    __tablename__ = "pairs"
    __table_args__ = (UniqueConstraint("pair_set_id", "prompt_id"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    pair_set_id: Mapped[int] = mapped_column(ForeignKey("pair_sets.id", ondelete="CASCADE"))
    prompt_id: Mapped[int] = mapped_column(ForeignKey("prompts.id"))
    chosen_candidate_id: Mapped[int] = mapped_column(BigId, ForeignKey("candidates.id"))
    rejected_candidate_id: Mapped[int] = mapped_column(BigId, ForeignKey("candidates.id"))
    chosen_text: Mapped[str] = mapped_column(Text)
    rejected_text: Mapped[str] = mapped_column(Text)
    chosen_reward: Mapped[float] = mapped_column(Float)
    rejected_reward: Mapped[float] = mapped_column(Float)
    margin: Mapped[float] = mapped_column(Float)
    # Words of each text (trees.word_count), written with the pair so that the
    # figures of `csr stats` never read a text (revision 0009).
    chosen_words: Mapped[int | None] = mapped_column(Integer)
    rejected_words: Mapped[int | None] = mapped_column(Integer)


class Judgement(Base):
    """One verdict of the self-rewarding judge (paper table 3) on two sampled
    responses of one prompt: the prompt it was given, its whole output, and the
    verdict parsed from it, or why none could be parsed."""

    __tablename__ = "judgements"
    __table_args__ = (
        UniqueConstraint("iteration", "prompt_id", "first_node", "second_node", name="uq_judgements_pair"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    iteration: Mapped[int] = mapped_column(ForeignKey("iterations.number"))
    prompt_id: Mapped[int] = mapped_column(ForeignKey("prompts.id"))
    # The two samples shown as "Response 1" and "Response 2" (candidate nodes of the one-level tree).
    first_node: Mapped[int] = mapped_column(Integer)
    second_node: Mapped[int] = mapped_column(Integer)
    # The seed the prompt's samples were drawn with (from the iteration's seed and the prompt).
    sample_seed: Mapped[int] = mapped_column(BigInteger)
    judge_prompt: Mapped[str] = mapped_column(Text)
    output: Mapped[str] = mapped_column(Text)
    output_token_ids: Mapped[list] = mapped_column(JSON)
    # 1 or 2: which response the judge preferred; NULL when its output names neither.
    verdict: Mapped[int | None] = mapped_column(Integer)
    parse_error: Mapped[str | None] = mapped_column(Text)


class OutsidePair(Base):
    """One pair of an imported preference data set: no search tree behind it,
    only the texts (the trainer tokenises them and computes the reference)."""

    __tablename__ = "outside_pairs"
    __table_args__ = (UniqueConstraint("pair_set_id", "position", name="uq_outside_pairs_position"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    pair_set_id: Mapped[int] = mapped_column(ForeignKey("pair_sets.id", ondelete="CASCADE"))
    # The record's place in the file (from 1) and its id there, if it had one.
    position: Mapped[int] = mapped_column(Integer)
    external_id: Mapped[str | None] = mapped_column(String(255))
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id"), index=True)
    prompt: Mapped[str] = mapped_column(Text)
    chosen_text: Mapped[str] = mapped_column(Text)
    rejected_text: Mapped[str] = mapped_column(Text)


class TrainingRun(Base):
    __tablename__ = "training_runs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    iteration: Mapped[int] = mapped_column(ForeignKey("iterations.number"))
    pair_set_id: Mapped[int] = mapped_column(ForeignKey("pair_sets.id"))
    selection_sql: Mapped[str] = mapped_column(Text)
    pairs_hash: Mapped[str] = mapped_column(String(64))
    hyperparams: Mapped[dict] = mapped_column(JSON)
    metrics: Mapped[list | None] = mapped_column(JSON)
    state: Mapped[str] = mapped_column(String(16))  # running | done | failed
    checkpoint_dir: Mapped[str] = mapped_column(Text)
    output_version: Mapped[int | None] = mapped_column(ForeignKey("model_versions.version"))
    started_at: Mapped[datetime] = mapped_column(DateTime)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime)


class Evaluation(Base):
    """One evaluation of one model version: a benchmark run with given settings
    on a given data set (`fingerprint` hashes all three), its metrics and its
    per-item answers. CHAIR rows also fill chair_s, chair_i and mean_words."""

    __tablename__ = "evaluations"
    __table_args__ = (
        UniqueConstraint("model_version", "fingerprint", name="uq_evaluations_version_fingerprint"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_version: Mapped[int] = mapped_column(ForeignKey("model_versions.version"))
    benchmark: Mapped[str] = mapped_column(String(128))
    n_responses: Mapped[int] = mapped_column(Integer)
    chair_s: Mapped[float | None] = mapped_column(Float)
    chair_i: Mapped[float | None] = mapped_column(Float)
    mean_words: Mapped[float | None] = mapped_column(Float)
    details: Mapped[dict | None] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime)
    fingerprint: Mapped[str] = mapped_column(String(64))
    dataset_hash: Mapped[str | None] = mapped_column(String(64))
    settings: Mapped[dict | None] = mapped_column(JSON)
    metrics: Mapped[dict | None] = mapped_column(JSON)
    items: Mapped[list | None] = mapped_column(JSON)
