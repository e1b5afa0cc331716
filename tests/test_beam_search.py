"""The token-level diverse beam search.

The batched, cached search is checked against a plain reference written here
(one sequence at a time, a full forward pass over the whole sequence at every
step, Python lists instead of tensors), against transformers' own beam search,
and against hand-made logit tables.
"""

from __future__ import annotations

from collections import defaultdict

import pytest
import torch

from csr.engine.search.beam_search import (
    EOS,
    MAX_NEW_TOKENS,
    SENTENCE_END,
    BeamSettings,
    group_beam_search,
)
from csr.engine.search.expansion import PromptPrefix, expand_partials
from csr.engine.search.kv_cache import _assign_slots, _BufferLayer
from tests.worlds import PROMPT

NEG = -1.0e9


# --------------------------------------------------------------------------- reference


def _reference_logprobs(policy, inputs, tokens: list[int]) -> torch.Tensor:
    """Next-token log-probs after prompt + tokens: no cache, no batching."""
    ids = torch.cat([inputs["input_ids"], torch.tensor([tokens], dtype=torch.long)], dim=1)
    with torch.inference_mode():
        out = policy.model(
            input_ids=ids,
            pixel_values=inputs["pixel_values"],
            attention_mask=torch.ones_like(ids),
            use_cache=False,
        )
    return torch.log_softmax(out.logits[0, -1].float(), dim=-1)


def reference_group_beam_search(policy, inputs, prefix: list[int], cap: int, settings: BeamSettings):
    """Diverse beam search as transformers 4.x runs it (per group: top-k
    candidates, finished hypotheses among the top `size` ranks, Hamming
    penalty for the tokens earlier groups picked at this step), with the
    v5 early-stopping heuristic. Returns [(tokens, raw logprobs, score)]."""
    groups = settings.num_beam_groups
    size = settings.num_beams // groups
    stop = set(settings.stop_ids)
    k = max(2, 1 + len(stop)) * size
    beams = [[([], [], 0.0 if b == 0 else NEG) for b in range(size)] for _ in range(groups)]
    hyps: list[list[tuple[float, list[int], list[float]]]] = [[] for _ in range(groups)]
    improvable = [True] * groups
    done = [False] * groups
    for t in range(cap):
        chosen_this_step: list[int] = []
        for g in range(groups):
            if done[g]:
                continue
            candidates = []
            for b, (tokens, _, score) in enumerate(beams[g]):
                raw = _reference_logprobs(policy, inputs, prefix + tokens)
                penalised = raw.clone()
                for token in chosen_this_step:
                    penalised[token] -= settings.diversity_penalty
                # float32 like the real search, so that -1e9 beams tie the same way
                totals = (penalised + torch.tensor(score, dtype=torch.float32)).tolist()
                for v, total in enumerate(totals):
                    candidates.append((total, b, v, float(raw[v])))
            candidates.sort(key=lambda c: -c[0])
            top = candidates[:k]
            hits = [(v in stop) or (t + 1 >= cap) for _, _, v, _ in top]
            running = []
            # v4 picks running beams among the non-stop tokens even at the length cap,
            # so the penalty of later groups sees them
            for total, b, v, raw in top:
                if v not in stop and len(running) < size:
                    tokens, lps, _ = beams[g][b]
                    running.append((tokens + [v], lps + [raw], total))
            for total, b, v, raw in top:  # only if too few candidates lack a stop token
                if v in stop and len(running) < size:
                    tokens, lps, _ = beams[g][b]
                    running.append((tokens + [v], lps + [raw], total + NEG))
            if improvable[g]:
                for rank, ((total, b, v, raw), hit) in enumerate(zip(top, hits, strict=True)):
                    if hit and rank < size:
                        tokens, lps, _ = beams[g][b]
                        hyps[g].append((total / (t + 1), tokens + [v], lps + [raw]))
                hyps[g] = sorted(hyps[g], key=lambda h: -h[0])[:size]
            beams[g] = running
            chosen_this_step += [tokens[-1] for tokens, _, _ in running]
            best = running[0][2] / (t + 1)
            if len(hyps[g]) == size and best <= min(h[0] for h in hyps[g]):
                improvable[g] = False
            done[g] = not improvable[g] or all(hits)
        if all(done):
            break
    everything = sorted((h for group in hyps for h in group), key=lambda h: -h[0])
    return [(tokens, lps, score) for score, tokens, lps in everything]


def _settings(policy, beams: int, groups: int, penalty: float) -> BeamSettings:
    return BeamSettings(
        num_beams=beams,
        num_beam_groups=groups,
        diversity_penalty=penalty,
        eos_token_id=policy.eos_token_id,
        sentence_end_ids=policy.sentence_end_ids,
    )


def _words(policy, text: str) -> list[int]:
    return policy.tokenizer(text, add_special_tokens=False)["input_ids"]


# Tiny matrices: one thread beats two on a shared 2-core machine.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize(
    "which,beams,groups,penalty",
    [
        ("trained_policy", 5, 5, 3.0),  # the paper's setting
        ("policy", 4, 2, 1.5),  # several beams per group
        ("trained_policy", 3, 1, 0.0),  # plain beam search
    ],
)
def test_batched_cached_search_equals_plain_reference(request, colour_images, which, beams, groups, penalty):
    policy = request.getfixturevalue(which)
    image = colour_images["green"]
    settings = _settings(policy, beams, groups, penalty)
    # Partials of different lengths (the empty one is depth 0) and different caps,
    # so padding, masks, position ids and per-parent stopping all matter.
    partials = [
        [],
        _words(policy, "there is a big green square ."),
        _words(policy, "the background is red . the square is on the left"),
    ]
    caps = [5, 4, 6]
    prefix = PromptPrefix(policy, image, PROMPT)
    got = expand_partials(prefix, partials, caps, settings)
    inputs = policy.encode(image, PROMPT)
    for part, cap, beams_got in zip(partials, caps, got, strict=True):
        want = reference_group_beam_search(policy, inputs, part, cap, settings)
        assert [b.token_ids for b in beams_got] == [w[0] for w in want]
        for b, (_, lps, score) in zip(beams_got, want, strict=True):
            assert b.token_logprobs == pytest.approx(lps, abs=1e-4)
            assert b.score == pytest.approx(score, abs=1e-4)
            assert len(b.token_ids) <= cap


def test_chunked_batches_give_the_same_result(trained_policy, colour_images):
    settings = _settings(trained_policy, 5, 5, 3.0)
    partials = [[], _words(trained_policy, "there is a small red circle ."), _words(trained_policy, "the")]
    prefix = PromptPrefix(trained_policy, colour_images["red"], PROMPT)
    whole = expand_partials(prefix, partials, [8, 8, 8], settings)
    chunked = expand_partials(prefix, partials, [8, 8, 8], settings, max_rows=5)
    assert [[b.token_ids for b in p] for p in whole] == [[b.token_ids for b in p] for p in chunked]


def test_rows_move_only_when_they_must():
    # beams 0 and 2 go on, 1 and 3 died: row 2 moves into the free place 1
    assert _assign_slots([0, 2]) == ([0, 1], [1], [2])
    # one beam forks into two (as within a group): the fork is copied
    assert _assign_slots([1, 1, 0]) == ([1, 2, 0], [2], [1])
    # nothing changes: nothing moves
    assert _assign_slots([0, 1, 2]) == ([0, 1, 2], [], [])


def test_buffer_layer_grows_and_moves_rows():
    keys, values = torch.randn(3, 2, 4, 5), torch.randn(3, 2, 4, 5)
    layer = _BufferLayer(keys, values, capacity=5)
    new_k, new_v = torch.randn(3, 2, 3, 5), torch.randn(3, 2, 3, 5)
    got_k, got_v = layer.update(new_k, new_v)  # past the capacity: grows
    assert torch.equal(got_k, torch.cat([keys, new_k], dim=2))
    assert torch.equal(got_v, torch.cat([values, new_v], dim=2))
    layer.move_rows(torch.tensor([0]), torch.tensor([2]))
    layer.truncate_rows(2)
    assert torch.equal(layer.keys[0], got_k[2]) and torch.equal(layer.keys[1], got_k[1])
    layer.reorder_cache(torch.tensor([1, 1, 0]))
    assert layer.get_seq_length() == 7 and torch.equal(layer.values[2], got_v[2])


@pytest.mark.parametrize("beams", [2, 4])
@pytest.mark.parametrize("which", ["policy", "trained_policy"])
def test_one_group_without_penalty_equals_transformers_generate(request, colour_images, which, beams):
    policy = request.getfixturevalue(which)
    image = colour_images["blue"]
    max_new = 9
    settings = _settings(policy, beams, 1, 0.0)
    ours = expand_partials(PromptPrefix(policy, image, PROMPT), [[]], [max_new], settings)[0]
    inputs = policy.encode(image, PROMPT)
    with torch.inference_mode():
        out = policy.model.generate(
            **inputs,
            num_beams=beams,
            num_return_sequences=beams,
            do_sample=False,
            eos_token_id=[*policy.sentence_end_ids, policy.eos_token_id],
            max_new_tokens=max_new,
            output_scores=True,
            return_dict_in_generate=True,
        )
    start = inputs["input_ids"].shape[1]
    assert len(ours) == beams
    for beam, sequence, score in zip(ours, out.sequences, out.sequences_scores, strict=True):
        generated = sequence[start:].tolist()
        # transformers pads the shorter finished sequences after their stop token
        assert generated[: len(beam.token_ids)] == beam.token_ids
        assert beam.score == pytest.approx(float(score), abs=1e-4)


# --------------------------------------------------------------------------- diversity


class _TableModel:
    """Next-token logits that depend only on the last token: a fixed table."""

    def __init__(self, table: torch.Tensor):
        self.table = table
        self.calls = 0

    def step(self, rows: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.table[tokens]


def _table(vocab: int = 8, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(vocab, vocab, generator=gen) * 2.0


def _table_settings(groups: int, penalty: float, per_group: int = 1) -> BeamSettings:
    # token 0 ends the response, token 1 ends a sentence
    return BeamSettings(
        num_beams=groups * per_group,
        num_beam_groups=groups,
        diversity_penalty=penalty,
        eos_token_id=0,
        sentence_end_ids=(1,),
    )


def _first_logits_without_stops(vocab: int = 8) -> torch.Tensor:
    logits = torch.linspace(3.0, 0.0, vocab)  # token 2 best, then 3, ...
    logits[0] = logits[1] = -20.0
    return logits[None]


def test_without_penalty_groups_that_would_agree_return_the_same_sequence():
    table = _table()
    model = _TableModel(table)
    beams = group_beam_search(_first_logits_without_stops(), model.step, [6], _table_settings(3, 0.0))[0]
    assert len(beams) == 3
    assert beams[0].token_ids == beams[1].token_ids == beams[2].token_ids


def test_huge_penalty_makes_every_group_start_differently():
    model = _TableModel(_table())
    beams = group_beam_search(_first_logits_without_stops(), model.step, [6], _table_settings(4, 1e4))[0]
    first_tokens = [b.token_ids[0] for b in beams]
    assert sorted(first_tokens) == [2, 3, 4, 5]  # the four best first tokens, one per group


def test_hamming_penalty_counts_tokens_chosen_by_earlier_groups():
    # Step 0 log-probs: token 2 leads token 3 by 0.5 and token 4 by 1.0 (logits 3, 2.5, 2.0).
    first = torch.full((1, 8), -20.0)
    first[0, 2], first[0, 3], first[0, 4] = 3.0, 2.5, 2.0
    model = _TableModel(_table())
    lp = torch.log_softmax(first[0], dim=-1)
    # penalty 0.4 < 0.5: group 1 keeps token 2 despite group 0 having chosen it
    beams = group_beam_search(first, model.step, [1], _table_settings(2, 0.4))[0]
    assert sorted(b.token_ids[0] for b in beams) == [2, 2]
    # penalty 0.6 > 0.5: group 1 moves to token 3; group 2 pays 0.6 for 2 and 0.6 for 3 -> 2 - 0.6 vs 3 - 0.6
    beams = group_beam_search(first, model.step, [1], _table_settings(3, 0.6))[0]
    assert sorted(b.token_ids[0] for b in beams) == [2, 2, 3]
    # the returned scores are the penalised ones; the log-probs are raw
    by_token = defaultdict(list)
    for b in beams:
        by_token[b.token_ids[0]].append(b)
    assert by_token[3][0].score == pytest.approx(float(lp[3]), abs=1e-6)
    assert sorted(b.score for b in by_token[2]) == pytest.approx([float(lp[2]) - 0.6, float(lp[2])], abs=1e-5)
    for b in beams:
        assert b.token_logprobs == pytest.approx([float(lp[b.token_ids[0]])], abs=1e-6)


def test_finish_reasons_and_caps():
    table = torch.full((8, 8), -5.0)
    table[:, 5] = 5.0  # after any token, token 5 is likely: nothing stops before the cap
    first = torch.full((1, 8), -5.0)
    first[0, 5] = 5.0
    first[0, 1] = 4.0  # a sentence end right away is the second best
    model = _TableModel(table)
    beams = group_beam_search(first, model.step, [4], _table_settings(1, 0.0, per_group=2))[0]
    reasons = {tuple(b.token_ids): b.finish_reason for b in beams}
    assert reasons[(1,)] == SENTENCE_END
    assert reasons[(5, 5, 5, 5)] == MAX_NEW_TOKENS

    first[0, 0] = 4.5  # now EOS is second best
    beams = group_beam_search(first, model.step, [3], _table_settings(1, 0.0, per_group=2))[0]
    assert {tuple(b.token_ids): b.finish_reason for b in beams}[(0,)] == EOS


# --------------------------------------------------------------------------- sentence level
