"""Reward arithmetic of CSR (section 3.1 of arXiv 2405.14622), as pure functions.

Raw inputs per candidate sentence: the summed log-probability of its tokens
and their count (from the search, no second forward pass) and the CLIP score
max(100 * cos, 0). Two presets turn them into the sentence reward R(s) and a
response score (spec/CSR.md):

- ``paper``: R_T = exp(logprob_sum) (eq. 2), R_I = CLIP score (eq. 3),
  R(s) = lam * R_I + (1 - lam) * R_T (eq. 4), response score = sum of R(s).
- ``reference-code`` (the authors' released code): both scores become ranks
  among the siblings expanded from the same parent; the text rank is taken on
  the path's running sum of length-normalised sentence log-probs, the image
  rank on the CLIP score; response score = mean of R(s).

The released code's rank is best = 1/n ... worst = 1 and it picks the response
with the *smallest* mean. We store ``1 - rank`` (best = 1 - 1/n ... worst = 0)
so that larger is better in both presets; since R(s) is linear in the ranks,
the mean of our R(s) is exactly ``1 - `` the released code's mean, so the
order of responses is the same.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

PAPER = "paper"
REFERENCE_CODE = "reference-code"
PRESETS = (PAPER, REFERENCE_CODE)


def _check_preset(preset: str) -> None:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")


def text_probability(logprob_sum: float) -> float:
    """R_T of eq. 2: the product of the token probabilities, from their log sum."""
    return math.exp(logprob_sum)


def normalized_logprob(logprob_sum: float, token_count: int) -> float:
    """The sentence log-probability divided by its length (length_penalty 1.0)."""
    return logprob_sum / max(token_count, 1)


def clip_reward(cosine: float) -> float:
    """R_I of eq. 3 from the cosine similarity of the image and text embeddings."""
    return max(100.0 * cosine, 0.0)


def calibrated(lam: float, image_score: float, text_score: float) -> float:
    """R(s) of eq. 4."""
    return lam * image_score + (1.0 - lam) * text_score


def sibling_rank_scores(values: Sequence[float]) -> list[float]:
    """Rank scores among siblings, oriented so that larger is better.

    The highest value ranks 1/n and the lowest 1 (as the released code's
    `Rank_Node.calculate_ranks`); the score is 1 - rank. Ties keep sibling
    order, as Python's stable sort does there.
    """
    n = len(values)
    order = sorted(range(n), key=lambda i: -values[i])
    scores = [0.0] * n
    for position, index in enumerate(order):
        scores[index] = 1.0 - (position + 1) / n
    return scores


def sentence_rewards(
    preset: str,
    lam: float,
    logprob_sums: Sequence[float],
    token_counts: Sequence[int],
    clip_scores: Sequence[float],
    parent_text_path: float = 0.0,
) -> list[float]:
    """R(s) for each sibling of one parent, in sibling order.

    `parent_text_path` is the parent's running sum of length-normalised
    sentence log-probs (only the reference-code preset uses it; it is the
    same for all siblings, so it cannot change their ranks, but it is what
    the released code ranks on).
    """
    _check_preset(preset)
    if preset == PAPER:
        return [
            calibrated(lam, r_i, text_probability(lp))
            for lp, r_i in zip(logprob_sums, clip_scores, strict=True)
        ]
    paths = [
        parent_text_path + normalized_logprob(lp, n)
        for lp, n in zip(logprob_sums, token_counts, strict=True)
    ]
    text_ranks = sibling_rank_scores(paths)
    image_ranks = sibling_rank_scores(list(clip_scores))
    return [calibrated(lam, i, t) for i, t in zip(image_ranks, text_ranks, strict=True)]


def cumulative(preset: str, parent_cumulative: float, parent_sentences: int, reward: float) -> float:
    """The response score of a path after appending a sentence with `reward`.

    `parent_sentences` is how many sentences the parent path holds (0 at the
    root). Paper: the sum of R(s); reference-code: their mean.
    """
    _check_preset(preset)
    if preset == PAPER:
        return parent_cumulative + reward
    return (parent_cumulative * parent_sentences + reward) / (parent_sentences + 1)


def response_score(preset: str, rewards: Sequence[float]) -> float:
    """The curation score of a whole response from its sentences' R(s)."""
    _check_preset(preset)
    if preset == PAPER:
        return float(sum(rewards))
    return float(sum(rewards) / len(rewards)) if rewards else 0.0
