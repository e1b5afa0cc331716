"""Reward arithmetic of both presets and the degenerate-candidate filters."""

from __future__ import annotations

import math

import pytest

from csr.engine import degenerate, rewards


def test_paper_sentence_reward_is_eq4_of_raw_scores():
    got = rewards.sentence_rewards("paper", 0.9, [-1.0, -3.0], [2, 5], [25.0, 0.0])
    assert got == pytest.approx([0.9 * 25.0 + 0.1 * math.exp(-1.0), 0.1 * math.exp(-3.0)])
    assert rewards.text_probability(-2.0) == pytest.approx(math.exp(-2.0))
    assert rewards.clip_reward(0.31) == pytest.approx(31.0)
    assert rewards.clip_reward(-0.2) == 0.0


@pytest.mark.parametrize("lam,expected", [(1.0, [30.0, 10.0]), (0.0, [math.exp(-4.0), math.exp(-0.5)])])
def test_lambda_ablations_use_one_score_only(lam, expected):
    assert rewards.sentence_rewards("paper", lam, [-4.0, -0.5], [4, 1], [30.0, 10.0]) == pytest.approx(expected)


def test_sibling_ranks_best_first_and_oriented_larger_is_better():
    # ranks: 7.0 -> 1/4 (best), 5.0 -> 2/4, 3.0 -> 3/4, 1.0 -> 1 (worst); score = 1 - rank
    assert rewards.sibling_rank_scores([3.0, 7.0, 1.0, 5.0]) == pytest.approx([0.25, 0.75, 0.0, 0.5])
    assert rewards.sibling_rank_scores([2.0]) == [0.0]
    # ties keep sibling order, as the released code's stable sort
    assert rewards.sibling_rank_scores([1.0, 1.0]) == pytest.approx([0.5, 0.0])


def test_reference_code_preset_ranks_length_normalised_text_and_clip():
    # normalised log-probs: -1/2 = -0.5, -3/2 = -1.5, -1/4 = -0.25 -> text ranks 2/3, 3/3, 1/3
    # clip: 10, 30, 20 -> image ranks 3/3, 1/3, 2/3
    got = rewards.sentence_rewards(
        "reference-code", 0.9, [-1.0, -3.0, -1.0], [2, 2, 4], [10.0, 30.0, 20.0], parent_text_path=-7.0
    )
    text = [1 - 2 / 3, 0.0, 1 - 1 / 3]
    image = [0.0, 1 - 1 / 3, 1 - 2 / 3]
    assert got == pytest.approx([0.9 * i + 0.1 * t for i, t in zip(image, text, strict=True)])


def test_reference_code_order_equals_released_code_order():
    """Our mean of (1 - rank) combinations is 1 - the released code's mean of ranks,
    so the response the released code picks (smallest mean) is our largest."""
    lam = 0.9
    paths = {  # per response: (text rank, clip rank) of each sentence, as the released code has them
        "a": [(1 / 3, 2 / 3), (1 / 2, 1 / 2)],
        "b": [(2 / 3, 1 / 3), (1.0, 1.0), (1 / 5, 1 / 5)],
        "c": [(1.0, 1 / 3)],
    }
    released = {k: sum((1 - lam) * t + lam * c for t, c in v) / len(v) for k, v in paths.items()}
    ours = {}
    for k, v in paths.items():
        cum, n = 0.0, 0
        for t, c in v:
            cum = rewards.cumulative("reference-code", cum, n, rewards.calibrated(lam, 1 - c, 1 - t))
            n += 1
        ours[k] = cum
    for k in paths:
        assert ours[k] == pytest.approx(1 - released[k])
    assert max(ours, key=ours.get) == min(released, key=released.get)


def test_cumulative_and_response_scores():
    assert rewards.cumulative("paper", 2.0, 3, 0.5) == pytest.approx(2.5)
    assert rewards.cumulative("reference-code", 0.6, 2, 0.3) == pytest.approx((1.2 + 0.3) / 3)
    assert rewards.cumulative("reference-code", 0.0, 0, 0.3) == pytest.approx(0.3)
    assert rewards.response_score("paper", [1.0, 2.0, 3.0]) == pytest.approx(6.0)
    assert rewards.response_score("reference-code", [1.0, 2.0, 3.0]) == pytest.approx(2.0)
    assert rewards.response_score("reference-code", []) == 0.0
    assert rewards.normalized_logprob(-6.0, 3) == pytest.approx(-2.0)
    with pytest.raises(ValueError, match="unknown preset"):
        rewards.cumulative("other", 0.0, 0, 1.0)


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
