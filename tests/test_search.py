"""The sentence-level search: the tree against its stated rules, the
rewards against plain forward passes and open_clip, the batched search against
the released code's way (tests/reference_search.py), both presets' capacity.
"""

from __future__ import annotations

import math
from collections import defaultdict

import pytest
import torch

from csr.engine.search.beam_search import EOS, MAX_LENGTH, MAX_NEW_TOKENS, SENTENCE_END
from csr.engine.search.config import SearchConfig
from csr.engine.search.sentence_search import sentence_beam_search
from tests.reference_search import naive_sentence_beam_search, response_text
from tests.worlds import PROMPT

# Tiny matrices: one thread beats two on a shared 2-core machine.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


SMALL = SearchConfig(max_new_tokens=12, max_length=40)


@pytest.fixture(scope="module")
def tree(trained_policy, clip_scorer, colour_images):
    return sentence_beam_search(trained_policy, clip_scorer, colour_images["red"], PROMPT, SMALL)


def test_tree_structure(tree):
    records = tree.records
    assert [r.node for r in records] == list(range(len(records)))
    children = defaultdict(list)
    for r in records:
        if r.parent_node is None:
            assert r.depth == 0
        else:
            parent = records[r.parent_node]
            assert parent.node < r.node and r.depth == parent.depth + 1
        children[r.parent_node].append(r)
    for parent, kids in children.items():
        assert [k.sibling_index for k in kids] == list(range(len(kids)))
        assert len(kids) == SMALL.num_token_beams
        if parent is not None:
            p = records[parent]
            # only kept, non-final, non-excluded candidates are expanded
            assert p.is_kept and not p.is_final and p.exclusion_reason is None
    for r in records:
        if r.is_kept and not r.is_final:
            assert r.node in children, "a kept partial response was never expanded"
    # the test model must exercise every kind of ending and some exclusions
    reasons = {r.finish_reason for r in records}
    assert EOS in reasons and SENTENCE_END in reasons
    assert any(r.is_final and r.is_kept for r in records)
    assert any(r.exclusion_reason == "duplicate" for r in records)


def test_final_candidates_end_the_response(tree):
    for r in tree.records:
        if r.is_final:
            assert r.finish_reason in (EOS, MAX_LENGTH) or _response_tokens(tree, r.node) >= SMALL.max_length
        else:
            assert r.finish_reason in (SENTENCE_END, MAX_NEW_TOKENS)
        assert r.token_count == len(tree.token_ids[r.node]) <= SMALL.max_new_tokens
        assert _response_tokens(tree, r.node) <= SMALL.max_length


def _path(records, node):
    out = []
    while node is not None:
        out.append(node)
        node = records[node].parent_node
    return out[::-1]


def _response_tokens(tree, node) -> int:
    return sum(len(tree.token_ids[n]) for n in _path(tree.records, node))


def test_active_set_is_top_and_bottom_k_by_cumulative_reward(tree):
    k = SMALL.num_beams
    by_depth = defaultdict(list)
    for r in tree.records:
        by_depth[r.depth].append(r)
    for level in by_depth.values():
        pool = [r for r in level if not r.is_final and r.exclusion_reason is None]
        ranked = sorted(pool, key=lambda r: -r.cumulative_reward)
        expected = ranked if len(ranked) <= 2 * k else ranked[:k] + ranked[-k:]
        assert {r.node for r in pool if r.is_kept} == {r.node for r in expected}
        assert all(r.is_kept for r in level if r.is_final and r.exclusion_reason is None)
        assert not any(r.is_kept for r in level if r.exclusion_reason is not None)


def test_paper_rewards_and_cumulative_sum(tree):
    lam = SMALL.lam
    for r in tree.records:
        assert r.r_t == pytest.approx(math.exp(r.logprob_sum), rel=1e-9)
        parent_cum = 0.0 if r.parent_node is None else tree.records[r.parent_node].cumulative_reward
        if r.finish_reason == EOS and not r.text.strip():  # end marker: adds nothing
            assert r.reward == 0.0 and r.cumulative_reward == pytest.approx(parent_cum)
        else:
            assert r.reward == pytest.approx(lam * r.r_i + (1 - lam) * r.r_t)
            assert r.cumulative_reward == pytest.approx(parent_cum + r.reward)


def test_texts_concatenate_to_the_decoded_response(tree, trained_policy):
    finals = [r for r in tree.records if r.is_final and r.is_kept]
    assert finals
    for r in finals:
        tokens = [t for n in _path(tree.records, r.node) for t in tree.token_ids[n]]
        assert response_text(tree.records, r.node) == trained_policy.decode(tokens).strip()


def test_r_t_equals_a_plain_forward_pass(tree, trained_policy, colour_images):
    inputs = trained_policy.encode(colour_images["red"], PROMPT)
    checked = 0
    for r in tree.records:
        if r.depth == 0 or checked >= 6:
            continue
        previous = [t for n in _path(tree.records, r.parent_node) for t in tree.token_ids[n]]
        sentence = tree.token_ids[r.node]
        ids = torch.cat([inputs["input_ids"], torch.tensor([previous + sentence])], dim=1)
        with torch.inference_mode():
            logits = trained_policy.model(
                input_ids=ids, pixel_values=inputs["pixel_values"], use_cache=False
            ).logits[0].float()
        log_probs = torch.log_softmax(logits, dim=-1)
        start = inputs["input_ids"].shape[1] + len(previous)
        recomputed = sum(float(log_probs[start - 1 + i, tok]) for i, tok in enumerate(sentence))
        assert r.logprob_sum == pytest.approx(recomputed, abs=1e-4)
        checked += 1
    assert checked == 6


def test_r_i_equals_open_clip_directly(tree, clip_scorer, colour_images):
    model, preprocess, tokenizer = clip_scorer.model, clip_scorer.preprocess, clip_scorer.tokenizer
    with torch.inference_mode():
        image = model.encode_image(preprocess(colour_images["red"])[None])
        image = image / image.norm(dim=-1, keepdim=True)
        for r in tree.records:
            if not r.text.strip():
                assert r.r_i == 0.0
                continue
            text = model.encode_text(tokenizer([r.text.strip()]))
            text = text / text.norm(dim=-1, keepdim=True)
            assert r.r_i == pytest.approx(max(100 * float(image[0] @ text[0]), 0.0), abs=1e-3)


def test_batched_search_equals_the_naive_released_code_way(trained_policy, clip_scorer, colour_images, tree):
    naive = naive_sentence_beam_search(trained_policy, clip_scorer, colour_images["red"], PROMPT, SMALL)
    assert len(naive.records) == len(tree.records)
    assert [r.text for r in naive.responses] == [r.text for r in tree.responses]
    for a, b in zip(tree.records, naive.records, strict=True):
        assert (a.node, a.parent_node, a.text, a.is_final, a.is_kept, a.exclusion_reason) == (
            b.node,
            b.parent_node,
            b.text,
            b.is_final,
            b.is_kept,
            b.exclusion_reason,
        )
        assert a.logprob_sum == pytest.approx(b.logprob_sum, abs=1e-4)
        assert a.r_i == pytest.approx(b.r_i, abs=1e-3)
        assert a.cumulative_reward == pytest.approx(b.cumulative_reward, abs=1e-3)
    # the point of batching: far fewer forward passes for the same tree
    assert tree.stats.forward_passes < naive.stats.forward_passes


def _path_of(records, node):
    path = []
    while node is not None:
        path.append(records[node])
        node = records[node].parent_node
    return path[::-1]


def test_reference_code_preset_is_the_released_search(trained_policy, clip_scorer, colour_images):
    config = SearchConfig(max_new_tokens=12, max_length=30, preset="reference-code")
    # one switch: the released selection, slicing, length and degenerate rules
    assert (config.select_by, config.keep_rule, config.degenerate_rules) == ("text", "reference-code", "reference-code")
    assert SearchConfig(preset="reference-code").max_new_tokens == 70
    assert SearchConfig().max_new_tokens == 74
    assert SearchConfig(preset="reference-code", max_new_tokens=9).max_new_tokens == 9
    result = sentence_beam_search(trained_policy, clip_scorer, colour_images["blue"], PROMPT, config)
    records = result.records
    lam = config.lam
    for r in records:
        end_marker = r.finish_reason == EOS and not r.text.strip()
        if end_marker or r.exclusion_reason:
            assert r.text_rank is None and r.image_rank is None
            continue
        assert r.reward == pytest.approx(lam * r.image_rank + (1 - lam) * r.text_rank)
        scored = [p for p in _path_of(records, r.node) if p.text_rank is not None]
        n = len(scored)
        released_key = sum(lam * (1 - p.image_rank) + (1 - lam) * (1 - p.text_rank) for p in scored) / (n + 1)
        assert r.cumulative_reward == pytest.approx(-released_key)
    # ranks among each parent's scored siblings: text on the penalised beam score
    siblings = defaultdict(list)
    for r in records:
        if r.text_rank is not None:
            siblings[r.parent_node].append(r)
    for group in siblings.values():
        by_score = sorted(group, key=lambda r: -r.beam_score)
        assert [r.text_rank for r in by_score] == pytest.approx([1 - (i + 1) / len(group) for i in range(len(group))])
    # released-code slicing of the active set: top k//2 - 1 and bottom k//2 by the path's beam score
    by_depth = defaultdict(list)
    for r in records:
        by_depth[r.depth].append(r)
    k = config.num_beams
    for level in by_depth.values():
        pool = [r for r in level if not r.is_final and r.exclusion_reason is None and r.text.strip()]
        kept = [r for r in pool if r.is_kept]
        assert len(kept) == (len(pool) if len(pool) < k else k // 2 - 1 + k // 2)
        if len(pool) >= k:
            beam_path = {r.node: sum(p.beam_score for p in _path_of(records, r.node)) for r in pool}
            order = sorted(pool, key=lambda r: -beam_path[r.node])
            assert {r.node for r in kept} == {r.node for r in order[: k // 2 - 1] + order[-(k // 2) :]}


def test_paper_capacity_is_num_beams_in_all(trained_policy, clip_scorer, colour_images):
    config = SearchConfig(max_new_tokens=6, max_length=40)
    result = sentence_beam_search(trained_policy, clip_scorer, colour_images["green"], PROMPT, config)
    assert result.stats.max_active <= config.num_beams
    by_depth = defaultdict(list)
    for r in result.records:
        by_depth[r.depth].append(r)
    saw_full_pool = False
    for level in by_depth.values():
        pool = [r for r in level if not r.is_final and r.exclusion_reason is None and r.text.strip()]
        kept = sorted((r for r in pool if r.is_kept), key=lambda r: -r.cumulative_reward)
        assert len(kept) == min(len(pool), config.num_beams)
        if len(pool) > config.num_beams:
            saw_full_pool = True
            order = sorted(pool, key=lambda r: -r.cumulative_reward)
            assert {r.node for r in kept} == {r.node for r in order[:3] + order[-2:]}
    assert saw_full_pool


def test_responses_are_the_exact_paths(tree):
    records = tree.records
    assert tree.responses and len(tree.responses) == sum(r.is_final and r.is_kept for r in records)
    for resp in tree.responses:
        path = _path_of(records, resp.leaf_node)
        assert resp.text == "".join(p.text for p in path)
        assert resp.token_ids == [t for p in path for t in p.token_ids]
        assert resp.logprob_sum == pytest.approx(sum(p.logprob_sum for p in path))
        scored = [p for p in path if p.text_rank is not None]
        assert resp.sentence_count == len(scored)
        assert resp.r_t_sum == pytest.approx(sum(p.r_t for p in scored))
        assert resp.r_i_sum == pytest.approx(sum(p.r_i for p in scored))
        assert resp.score("paper", 0.9) == pytest.approx(records[resp.leaf_node].cumulative_reward)


def test_search_is_deterministic(trained_policy, clip_scorer, colour_images, tree):
    again = sentence_beam_search(trained_policy, clip_scorer, colour_images["red"], PROMPT, SMALL)
    assert again.records == tree.records


def test_search_config_round_trip_and_validation():
    config = SearchConfig(preset="reference-code", lam=0.5)
    assert SearchConfig.from_dict(config.to_dict()) == config
    assert SearchConfig.from_dict({}) == SearchConfig()
    assert SearchConfig().to_dict()["diversity_penalty"] == 3.0
    with pytest.raises(ValueError, match="unknown search setting"):
        SearchConfig.from_dict({"num_beam": 5})
    with pytest.raises(ValueError, match="multiple"):
        SearchConfig(num_token_beams=5, num_beam_groups=2)
    with pytest.raises(ValueError, match="preset"):
        SearchConfig(preset="other")
    with pytest.raises(ValueError, match="lam"):
        SearchConfig(lam=1.5)
    with pytest.raises(ValueError, match="select_by"):
        SearchConfig(select_by="clip")
