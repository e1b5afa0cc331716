"""Reward arithmetic of both presets and the degenerate-candidate filters."""

from __future__ import annotations

import math

import pytest

from csr.engine import rewards
from csr.engine.search import degenerate


def test_paper_sentence_reward_is_eq4_of_raw_scores():
    got = [rewards.sentence_reward("paper", 0.9, rewards.text_probability(lp), r_i, 0, 0)
           for lp, r_i in ((-1.0, 25.0), (-3.0, 0.0))]
    assert got == pytest.approx([0.9 * 25.0 + 0.1 * math.exp(-1.0), 0.1 * math.exp(-3.0)])
    assert rewards.text_probability(-2.0) == pytest.approx(math.exp(-2.0))
    assert rewards.clip_reward(31.0) == pytest.approx(31.0)
    assert rewards.clip_reward(-20.0) == 0.0


@pytest.mark.parametrize("lam,expected", [(1.0, [30.0, 10.0]), (0.0, [math.exp(-4.0), math.exp(-0.5)])])
def test_lambda_ablations_use_one_score_only(lam, expected):
    got = [rewards.sentence_reward("paper", lam, rewards.text_probability(lp), r_i, 0, 0)
           for lp, r_i in ((-4.0, 30.0), (-0.5, 10.0))]
    assert got == pytest.approx(expected)


def test_sibling_ranks_best_first_and_oriented_larger_is_better():
    # ranks: 7.0 -> 1/4 (best), 5.0 -> 2/4, 3.0 -> 3/4, 1.0 -> 1 (worst); score = 1 - rank
    assert rewards.sibling_rank_scores([3.0, 7.0, 1.0, 5.0]) == pytest.approx([0.25, 0.75, 0.0, 0.5])
    assert rewards.sibling_rank_scores([2.0]) == [0.0]
    # ties keep sibling order, as the released code's stable sort
    assert rewards.sibling_rank_scores([1.0, 1.0]) == pytest.approx([0.5, 0.0])


def test_reference_code_sentence_reward_combines_the_two_ranks():
    assert rewards.sentence_reward("reference-code", 0.9, 0.5, 30.0, 0.25, 0.75) == pytest.approx(
        0.9 * 0.75 + 0.1 * 0.25
    )
    assert rewards.sentence_reward("paper", 0.9, 0.5, 30.0, 0.25, 0.75) == pytest.approx(0.9 * 30 + 0.1 * 0.5)


def _released_key(lam, ranks):
    """construct.py: the path list includes the root, so the sum of
    (1 - lam) * rank + lam * clip_rank is divided by (n + 1)."""
    return sum((1 - lam) * t + lam * c for t, c in ranks) / (len(ranks) + 1)


def test_reference_code_order_equals_released_code_order():
    """Our score is minus the released key, so the response the released code
    picks (smallest key) is our largest, and its rejected our smallest."""
    lam = 0.9
    paths = {  # per response: (text rank, clip rank) of each sentence, as the released code has them
        "a": [(1 / 3, 2 / 3), (1 / 2, 1 / 2)],
        "b": [(2 / 3, 1 / 3), (1.0, 1.0), (1 / 5, 1 / 5)],
        "c": [(1.0, 1 / 3)],
        "d": [(1 / 3, 1 / 3), (1 / 2, 1 / 2), (1 / 5, 1 / 5), (1 / 4, 1 / 4)],
    }
    released = {k: _released_key(lam, v) for k, v in paths.items()}
    ours = {
        k: rewards.response_score(
            "reference-code",
            lam,
            sentences=len(v),
            r_t_sum=0.0,
            r_i_sum=0.0,
            text_rank_sum=sum(1 - t for t, _ in v),
            image_rank_sum=sum(1 - c for _, c in v),
        )
        for k, v in paths.items()
    }
    for k in paths:
        assert ours[k] == pytest.approx(-released[k])
    assert max(ours, key=ours.get) == min(released, key=released.get)
    assert min(ours, key=ours.get) == max(released, key=released.get)


def test_the_n_plus_one_key_orders_differently_from_the_mean():
    """A hand-computed case where the mean over n (csr before) and the released
    (n + 1) key disagree: a long mediocre response against a short good one."""
    lam = 0.5
    short = [(0.5, 0.5)]  # mean 0.5, key 0.5 / 2 = 0.25
    long = [(0.5, 0.5), (0.5, 0.5), (0.5, 0.5), (0.2, 0.2)]  # mean 0.425, key 1.7 / 5 = 0.34
    mean = {k: sum((1 - lam) * t + lam * c for t, c in v) / len(v) for k, v in (("short", short), ("long", long))}
    assert min(mean, key=mean.get) == "long"
    assert _released_key(lam, short) < _released_key(lam, long)

    def ours(v):
        return rewards.response_score(
            "reference-code", lam, sentences=len(v), r_t_sum=0, r_i_sum=0,
            text_rank_sum=sum(1 - t for t, _ in v), image_rank_sum=sum(1 - c for _, c in v),
        )

    assert ours(short) > ours(long)


def test_paper_response_score_is_the_sum_of_sentence_rewards():
    sentences = [(0.5, 30.0), (0.1, 0.0), (0.9, 12.5)]  # (R_T, R_I)
    lam = 0.9
    want = sum(rewards.calibrated(lam, r_i, r_t) for r_t, r_i in sentences)
    got = rewards.response_score(
        "paper", lam, sentences=3, r_t_sum=sum(s[0] for s in sentences), r_i_sum=sum(s[1] for s in sentences),
        text_rank_sum=0.0, image_rank_sum=0.0,
    )
    assert got == pytest.approx(want)
    with pytest.raises(ValueError, match="unknown preset"):
        rewards.response_score("other", 0.9, sentences=0, r_t_sum=0, r_i_sum=0, text_rank_sum=0, image_rank_sum=0)


@pytest.mark.parametrize(
    "text,reason",
    [
        ("abc", degenerate.TOO_SHORT),
        ("  . ", degenerate.TOO_SHORT),
        ("The cat sits.\n\n\n\n\n\nOn the mat.", degenerate.TOO_MANY_NEWLINES),
        ("The sign says Привет.", degenerate.NON_LATIN),
        ("A man named 山田 waves.", degenerate.NON_LATIN),
        ("The text reads 안녕하세요.", degenerate.NON_LATIN),
        ("It is a sunny day 😀.", degenerate.EMOJI),
        ("The dog dog dog dog dog dog runs.", degenerate.REPEATED_WORD),
        ("very, very, very, very, very, very big.", degenerate.REPEATED_WORD),
        ("Wowwwwwwwwwwwwwww.", degenerate.REPEATED_CHAR),
        ("a list , , , , , , , , , , , , ,", degenerate.REPEATED_CHAR),
        ("space&nbsp;&nbsp;here", degenerate.REPEATED_CHAR),
    ],
)
def test_degenerate_texts_are_flagged(text, reason):
    assert degenerate.exclusion_reason(text) == reason


@pytest.mark.parametrize(
    "text",
    [
        " The image shows a red bus parked on the street.",
        "There are two dogs, a cat and a bird.",
        "The dog dog dog dog dog runs.",  # five in a row is still allowed
        "Café menu: 3 items at 10.00 each.",  # Latin accents and digits are fine
        "Line one.\nLine two.\nLine three.",
        "Mr. Smith's car is 1999 model.",
    ],
)
def test_ordinary_sentences_pass(text):
    assert degenerate.exclusion_reason(text) is None
