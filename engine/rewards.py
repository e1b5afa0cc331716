"""Reward arithmetic of CSR (section 3.1 of arXiv 2405.14622), as pure functions.

This module is the one definition of every formula: the search calls it while
it grows a tree, and `storage/curation.py`'s SQL computes the same response
score from the per-response sums the search stores (a test compares the two).

Raw inputs per candidate sentence: the summed log-probability of its tokens
(from the search, no second forward pass), the diversity-penalised,
length-normalised beam score the token search ranked it by, and CLIP's
100 * cos. Two presets turn them into the sentence reward R(s) and a
response score (spec/CSR.md):

- ``paper``: R_T = exp(logprob_sum) (eq. 2), R_I = max(100 cos, 0) (eq. 3),
  R(s) = lambda_weight * R_I + (1 - lambda_weight) * R_T (eq. 4), response score = sum of R(s).
- ``reference-code`` (the authors' released code): both scores become ranks
  among the scored siblings of one parent: the text rank on the penalised beam
  score (`sequences_scores`), the image rank on 100 cos (not clipped). The
  released response key is sum of lambda_weight * image_rank + (1 - lambda_weight) * text_rank
  over the path divided by (n + 1), because its path list includes the root
  (`construct.py`: `x[1] / len(x[0])`); the smallest key is chosen.

Orientation: the released rank is best = 1/n ... worst = 1. We store
``1 - rank`` (best = 1 - 1/n ... worst = 0) so that larger is better in both
presets. With R(s) = lambda_weight * image_score + (1 - lambda_weight) * text_score on those
scores, the released key of a response with n sentences is
(n - sum R(s)) / (n + 1), and our response score is its negation,
(sum R(s) - n) / (n + 1): the order of responses is the released order, reversed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from enum import StrEnum


class Preset(StrEnum):
    """The reward presets, for engine and cli alike. A StrEnum, so a preset
    compares equal to, and is stored as, its plain string."""

    paper = "paper"
    reference_code = "reference-code"


def check_preset(preset: str) -> Preset:
    try:
        return Preset(preset)
    except ValueError:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(Preset)}") from None


def text_probability(logprob_sum: float) -> float:
    """R_T of eq. 2: the product of the token probabilities, from their log sum."""
    return math.exp(logprob_sum)


def clip_reward(clip_score: float) -> float:
    """R_I of eq. 3 from CLIP's 100 * cos."""
    return max(clip_score, 0.0)


def calibrated(lambda_weight: float, image_score: float, text_score: float) -> float:
    """R(s) of eq. 4."""
    return lambda_weight * image_score + (1.0 - lambda_weight) * text_score


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


def sentence_reward(preset: str, lambda_weight: float, r_t: float, r_i: float, text_rank: float, image_rank: float) -> float:
    """R(s) of one scored sentence under `preset`."""
    check_preset(preset)
    if preset == Preset.paper:
        return calibrated(lambda_weight, r_i, r_t)
    return calibrated(lambda_weight, image_rank, text_rank)


def response_score(
    preset: str,
    lambda_weight: float,
    *,
    sentences: int,
    r_t_sum: float,
    r_i_sum: float,
    text_rank_sum: float,
    image_rank_sum: float,
) -> float:
    """The curation score of a response from the sums over its sentences.

    R(s) is linear in its inputs, so the sum of R(s) over a path is R of the
    sums: any lambda can be applied after the search, without the tree.
    """
    check_preset(preset)
    if preset == Preset.paper:
        return calibrated(lambda_weight, r_i_sum, r_t_sum)
    return (calibrated(lambda_weight, image_rank_sum, text_rank_sum) - sentences) / (sentences + 1)
