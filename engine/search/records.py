"""What a sentence-level search produces: its candidates, its final
responses and its counters, as plain records (engine/search/sentence_search.py
builds them; storage/trees.py writes them)."""

from __future__ import annotations

from dataclasses import dataclass, field

from csr.engine import rewards


@dataclass
class CandidateRecord:
    """One candidate sentence of one prompt's search tree (a `candidates` row)."""

    node: int
    parent_node: int | None
    depth: int
    sibling_index: int
    text: str
    token_count: int
    logprob_sum: float
    r_t: float
    r_i: float
    reward: float
    cumulative_reward: float
    is_final: bool
    is_kept: bool
    exclusion_reason: str | None
    finish_reason: str | None = None
    token_ids: list[int] = field(default_factory=list)
    # The diversity-penalised, length-normalised score the token search ranked it by.
    beam_score: float | None = None
    # 1 - rank among the scored siblings (None for end markers and excluded candidates).
    text_rank: float | None = None
    image_rank: float | None = None
    # False when `text` is only approximately what the tokens added (csr.engine.text).
    text_exact: bool = True


@dataclass
class ResponseRecord:
    """One final response of a tree (a `responses` row): its whole path, summed."""

    leaf_node: int
    text: str
    token_ids: list[int]
    sentence_count: int
    logprob_sum: float
    r_t_sum: float
    r_i_sum: float
    text_rank_sum: float
    image_rank_sum: float
    is_truncated: bool

    @property
    def token_count(self) -> int:
        return len(self.token_ids)

    def score(self, preset: str, lam: float) -> float:
        return rewards.response_score(
            preset,
            lam,
            sentences=self.sentence_count,
            r_t_sum=self.r_t_sum,
            r_i_sum=self.r_i_sum,
            text_rank_sum=self.text_rank_sum,
            image_rank_sum=self.image_rank_sum,
        )


@dataclass
class SearchStats:
    depths: int = 0
    candidates: int = 0
    finals: int = 0
    max_active: int = 0
    forward_passes: int = 0
    rows_forwarded: int = 0
    clip_calls: int = 0
    model_seconds: float = 0.0
    clip_seconds: float = 0.0
    total_seconds: float = 0.0


@dataclass
class SearchResult:
    records: list[CandidateRecord]
    responses: list[ResponseRecord] = field(default_factory=list)
    stats: SearchStats = field(default_factory=SearchStats)

    @property
    def token_ids(self) -> list[list[int]]:
        """Response token ids of each candidate's own sentence, indexed by node."""
        return [r.token_ids for r in self.records]
