"""Shared-prefix (cascade) attention: the same search as the plain per-row path.

The attention function is checked against a direct softmax on random
tensors; the whole token-level search against the per-row path on the tiny
models and on a LLaVA-shaped one (text hidden 256, 4 layers, 577 image
tokens), with forks, end markers and partial responses of different lengths;
bfloat16 runs through the same code.
"""

from __future__ import annotations

import types

import pytest
import torch

from csr.engine.demo import tiny
from csr.engine.search import cascade_attention as ca
from csr.engine.search.beam_search import EOS, MAX_NEW_TOKENS, SENTENCE_END, BeamSettings
from csr.engine.search.expansion import ExpandStats, PromptPrefix, expand_partials, expand_prompts
from csr.engine.search.kv_cache import CascadeRows
from tests.worlds import PROMPT

LLAVA_256x4 = tiny.TinyLlavaSize(
    image_size=192,
    patch_size=8,  # 24 x 24 patches + CLS = 577 image tokens
    vision_hidden=64,
    vision_layers=1,
    vision_heads=4,
    text_hidden=256,
    text_layers=4,
    text_heads=4,
    text_intermediate=512,
)


# Tiny matrices: one thread beats two on a shared 2-core machine.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --------------------------------------------------------------------------- the attention function


def _reference_attention(q, keys, values, allowed, scaling):
    """softmax(q k^T) v over the full key list (prefix + suffix) of each row."""
    scores = torch.einsum("hqd,hkd->hqk", q, keys) * scaling
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hqk,hkd->hqd", scores.softmax(-1), values)


@pytest.mark.parametrize("q_len", [1, 3])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_cascade_attention_equals_a_direct_softmax(q_len, dtype, tol):
    torch.manual_seed(0)
    heads, kv_heads, dim = 4, 2, 8  # grouped-query attention: 2 query heads per kv head
    prefix_lengths = [5, 9]
    row_prompt = torch.tensor([1, 0, 1, 1, 0])
    rows, s_len = row_prompt.numel(), 6
    prefixes = [
        ca.PrefixKV([(torch.randn(1, kv_heads, n, dim, dtype=dtype), torch.randn(1, kv_heads, n, dim, dtype=dtype))])
        for n in prefix_lengths
    ]
    cache = ca.SuffixCache(1, rows, kv_heads, dim, s_len, dtype, "cpu")
    # Earlier columns with padding (invalid) in some rows; the new q_len columns all real.
    old = s_len - q_len
    valid_old = torch.rand(rows, old) > 0.4
    cache.begin(valid_old)
    cache.update(torch.randn(rows, kv_heads, old, dim, dtype=dtype), torch.randn(rows, kv_heads, old, dim, dtype=dtype), 0)
    cache.commit()
    cache.begin(torch.ones(rows, q_len, dtype=torch.bool))
    keys, values = cache.update(
        torch.randn(rows, kv_heads, q_len, dim, dtype=dtype), torch.randn(rows, kv_heads, q_len, dim, dtype=dtype), 0
    )
    query = torch.randn(rows, heads, q_len, dim, dtype=dtype)
    state = ca.CascadeState(prefixes, ca.row_groups(row_prompt, 2), cache)
    module = types.SimpleNamespace(layer_idx=0)
    got, _ = ca.cascade_attention_forward(module, query, keys, values, None, 0.3, **{ca.STATE_KWARG: state})
    assert got.shape == (rows, q_len, heads, dim) and got.dtype == dtype

    for r in range(rows):
        prefix = prefixes[int(row_prompt[r])]
        for h in range(heads):
            kvh = h // (heads // kv_heads)
            all_k = torch.cat([prefix.keys[0][kvh], keys[r, kvh]]).float()
            all_v = torch.cat([prefix.values[0][kvh], values[r, kvh]]).float()
            allowed = torch.zeros(q_len, prefix.length + s_len, dtype=torch.bool)
            allowed[:, : prefix.length] = True
            for i in range(q_len):
                allowed[i, prefix.length : prefix.length + old] = valid_old[r]
                allowed[i, prefix.length + old : prefix.length + old + i + 1] = True  # causal
            want = _reference_attention(query[r, h].float()[None], all_k[None], all_v[None], allowed[None], 0.3)[0]
            assert torch.allclose(got[r, :, h].float(), want, atol=tol, rtol=tol)


# --------------------------------------------------------------------------- whole search


def _stop_settings(policy, prefix: PromptPrefix, beams: int, groups: int) -> BeamSettings:
    """Stop tokens a random model actually picks: its second likeliest next
    token after the prompt as EOS and the next two as full stops (the
    likeliest stays free, so some beams run to the cap): end markers (EOS
    right away), sentence ends and length caps all occur."""
    likely = prefix.last_logits.topk(4).indices.tolist()
    return BeamSettings(
        num_beams=beams,
        num_beam_groups=groups,
        diversity_penalty=1.0,
        eos_token_id=likely[1],
        sentence_end_ids=tuple(likely[2:]),
    )


def _assert_same(plain, shared, tol: float = 1e-5) -> None:
    assert len(plain) == len(shared)
    for want_beams, got_beams in zip(plain, shared, strict=True):
        assert [b.token_ids for b in got_beams] == [b.token_ids for b in want_beams]
        assert [b.finish_reason for b in got_beams] == [b.finish_reason for b in want_beams]
        for got, want in zip(got_beams, want_beams, strict=True):
            assert got.token_logprobs == pytest.approx(want.token_logprobs, abs=tol)
            assert got.score == pytest.approx(want.score, abs=tol)


def _count_forks(monkeypatch) -> dict[str, int]:
    moved = {"rows": 0}
    original = ca.SuffixCache.move_rows

    def counting(self, dest, src):
        moved["rows"] += dest.numel()
        original(self, dest, src)

    monkeypatch.setattr(ca.SuffixCache, "move_rows", counting)
    return moved


def _check_policy(policy, image, monkeypatch, partial_texts, caps, beams=6, groups=2, own_stops=False):
    prefix = PromptPrefix(policy, image, PROMPT)
    if own_stops:  # a trained model that ends sentences and responses by itself
        settings = BeamSettings(beams, groups, 3.0, policy.eos_token_id, policy.sentence_end_ids)
    else:
        settings = _stop_settings(policy, prefix, beams, groups)
    words = [policy.tokenizer(t, add_special_tokens=False)["input_ids"] for t in partial_texts]
    plain_stats = ExpandStats()
    plain = expand_partials(prefix, words, caps, settings, stats=plain_stats, attention="plain")
    moved = _count_forks(monkeypatch)
    stats = ExpandStats()
    shared = expand_partials(prefix, words, caps, settings, stats=stats, attention="cascade")
    _assert_same(plain, shared)
    reasons = {b.finish_reason for beams_ in shared for b in beams_}
    assert {EOS, SENTENCE_END, MAX_NEW_TOKENS} <= reasons, reasons
    assert any(b.token_ids == [settings.eos_token_id] for beams_ in shared for b in beams_)  # an end marker
    assert moved["rows"] > 0  # beams forked or moved: suffix rows were copied
    # The prefix is held once instead of once per row: at the widest step
    # (R rows, at least one parent's beams) the per-row path held R - 1 more copies.
    saved = plain_stats.peak_kv_bytes - stats.peak_kv_bytes
    assert saved % prefix.kv.nbytes == 0 and saved // prefix.kv.nbytes + 1 >= beams
    return prefix, settings, words


def test_tiny_models_shared_prefix_equals_per_row(policy, trained_policy, colour_images, monkeypatch):
    texts = ["", "there is a big red square .", "the background is green . the"]
    _check_policy(policy, colour_images["red"], monkeypatch, texts, [5, 4, 6])
    _check_policy(
        trained_policy, colour_images["blue"], monkeypatch, texts, [6, 3, 5], beams=5, groups=5, own_stops=True
    )


@pytest.fixture(scope="module")
def llava_256x4(tmp_path_factory, tiny_tokenizer):
    from csr.engine.loading import load_policy

    model, processor = tiny.build_tiny_llava(tiny_tokenizer, LLAVA_256x4, seed=3)
    directory = tiny.save_pretrained(model, processor, tmp_path_factory.mktemp("llava-256x4"))
    return load_policy(str(directory))


def test_256x4_model_shared_prefix_equals_per_row(llava_256x4, colour_images, monkeypatch):
    texts = ["", "the picture shows", "there is a small green circle on the left ."]
    prefix, _, _ = _check_policy(llava_256x4, colour_images["green"], monkeypatch, texts, [5, 6, 4])
    assert prefix.length > 577


def test_several_prompts_in_one_batch_equal_each_alone(trained_policy, colour_images):
    words = [trained_policy.tokenizer(t, add_special_tokens=False)["input_ids"] for t in ["", "the background is"]]
    prefixes = [
        PromptPrefix(trained_policy, colour_images["red"], PROMPT),
        PromptPrefix(trained_policy, colour_images["yellow"], "What is in the picture?"),
    ]
    assert prefixes[0].length != prefixes[1].length
    settings = BeamSettings(5, 5, 3.0, trained_policy.eos_token_id, trained_policy.sentence_end_ids)
    stats = ExpandStats()
    together = expand_prompts([(p, words, [6, 5]) for p in prefixes], settings, stats=stats)
    assert stats.forward_passes <= 7  # one extension pass and at most one per token, for both prompts
    for prefix, got in zip(prefixes, together, strict=True):
        _assert_same(expand_partials(prefix, words, [6, 5], settings, attention="plain"), got)


def test_bfloat16_search_runs_and_stays_close(trained_llava_dir, colour_images):
    from csr.engine.loading import load_policy

    fp32 = load_policy(str(trained_llava_dir))
    bf16 = load_policy(str(trained_llava_dir), dtype="bfloat16")
    assert bf16.model.dtype == torch.bfloat16
    settings = BeamSettings(5, 5, 3.0, fp32.eos_token_id, fp32.sentence_end_ids)
    partial = fp32.tokenizer("there is a", add_special_tokens=False)["input_ids"]
    prefix16 = PromptPrefix(bf16, colour_images["green"], PROMPT)
    assert prefix16.kv.keys[0].dtype == torch.bfloat16
    got = expand_partials(prefix16, [[], partial], [6, 6], settings)
    want = expand_partials(PromptPrefix(fp32, colour_images["green"], PROMPT), [[], partial], [6, 6], settings)
    for got_beams, want_beams in zip(got, want, strict=True):
        assert len(got_beams) == settings.num_beams
        # bfloat16 may pick other tokens later on; the best first token's log-prob is close.
        assert got_beams[0].token_logprobs[0] == pytest.approx(want_beams[0].token_logprobs[0], abs=0.1)
        for beam in got_beams:
            assert all(-1e4 < lp <= 0 for lp in beam.token_logprobs)


def test_cascade_rows_keep_prompt_of_each_row(trained_policy, colour_images):
    prefixes = [PromptPrefix(trained_policy, colour_images[c], PROMPT) for c in ("red", "blue")]
    rows = CascadeRows(
        trained_policy.model,
        [p.kv for p in prefixes],
        torch.tensor([0, 1]),
        torch.tensor([prefixes[0].length, prefixes[1].length]),
        capacity=4,
    )
    # Fan out, then fork row 1 (prompt 1) into two and drop the others.
    rows.step(torch.tensor([0, 0, 1, 1]), torch.tensor([5, 6, 7, 8]))
    rows.step(torch.tensor([3, 3]), torch.tensor([5, 6]))
    assert rows.row_prompt.tolist() == [1, 1]
    assert rows.cache.length == 2 and rows.cache.rows == 2


# --------------------------------------------------------------------------- several prompts per batch


def _assert_same_trees(got, want):
    assert len(got.records) == len(want.records) > 0
    for g, w in zip(got.records, want.records, strict=True):
        assert (g.parent_node, g.text, g.token_ids, g.finish_reason, g.is_final, g.is_kept, g.exclusion_reason) == (
            w.parent_node, w.text, w.token_ids, w.finish_reason, w.is_final, w.is_kept, w.exclusion_reason
        )
        assert g.logprob_sum == pytest.approx(w.logprob_sum, abs=1e-5)
        assert g.beam_score == pytest.approx(w.beam_score, abs=1e-5)
        assert g.cumulative_reward == pytest.approx(w.cumulative_reward, abs=1e-4)
    assert [r.text for r in got.responses] == [r.text for r in want.responses]


def _four_jobs(colour_images):
    from csr.engine.search.batch_search import PromptJob

    jobs = [PromptJob(colour_images[c], PROMPT) for c in ("red", "green", "blue")]
    jobs.append(PromptJob(colour_images["yellow"], "What is in the picture?"))
    return jobs


def _one_prompt_kv_bytes(policy, job, config):
    from csr.engine.search.batch_search import kv_bytes_per_prompt

    return kv_bytes_per_prompt(policy.model, config, PromptPrefix(policy, job.image, job.prompt_text).length)


@pytest.mark.parametrize("in_flight", [4, 2, 1])
def test_search_prompts_equals_sentence_beam_search_prompt_by_prompt(
    trained_policy, clip_scorer, colour_images, in_flight
):
    """Whatever the budget lets fly together (all four, two with the next
    prompt taking a finished one's place, one at a time), each tree is the
    one the prompt grows alone."""
    from csr.engine.search.batch_search import search_prompts
    from csr.engine.search.config import SearchConfig
    from csr.engine.search.sentence_search import sentence_beam_search

    config = SearchConfig(max_new_tokens=8, max_length=24)
    jobs = _four_jobs(colour_images)
    budget = in_flight * _one_prompt_kv_bytes(trained_policy, jobs[0], config)
    stats = ExpandStats()
    together = search_prompts(trained_policy, clip_scorer, jobs, config, kv_budget=budget, stats=stats)
    alone_passes = 0
    for job, got in zip(jobs, together, strict=True):
        want = sentence_beam_search(trained_policy, clip_scorer, job.image, job.prompt_text, config)
        alone_passes += want.stats.forward_passes - 1
        _assert_same_trees(got, want)
    if in_flight == 1:
        assert stats.forward_passes == alone_passes
    else:
        # Pooled: the prompts' expansions share forward passes.
        assert stats.forward_passes < alone_passes


def test_a_finished_prompt_makes_room_for_the_next(trained_policy, clip_scorer, colour_images):
    """Two in flight of three, the first two of different depths: the third
    starts when the shallower tree ends, not when both have (the
    batch-by-batch schedule), so the loop makes fewer forward passes than
    running the first two together and then the third."""
    from csr.engine.search.batch_search import search_prompts
    from csr.engine.search.config import SearchConfig

    config = SearchConfig(max_new_tokens=8, max_length=24)
    jobs = _four_jobs(colour_images)
    alone = search_prompts(trained_policy, clip_scorer, jobs, config, kv_budget=0)
    by_depth = {r.stats.depths: job for r, job in zip(alone, jobs, strict=True)}
    assert len(by_depth) >= 2, "the world's prompts should grow trees of different depths"
    shallow, deep = by_depth[min(by_depth)], by_depth[max(by_depth)]
    third = next(job for job in jobs if job not in (shallow, deep))
    two = 2 * max(_one_prompt_kv_bytes(trained_policy, job, config) for job in (shallow, deep, third))
    continuous, first_two, then_third = ExpandStats(), ExpandStats(), ExpandStats()
    search_prompts(trained_policy, clip_scorer, [shallow, deep, third], config, kv_budget=two, stats=continuous)
    search_prompts(trained_policy, clip_scorer, [shallow, deep], config, kv_budget=two, stats=first_two)
    search_prompts(trained_policy, clip_scorer, [third], config, kv_budget=two, stats=then_third)
    assert continuous.forward_passes < first_two.forward_passes + then_third.forward_passes


def test_kv_bytes_per_prompt(trained_policy):
    from csr.engine.search.batch_search import kv_bytes_per_prompt
    from csr.engine.search.config import SearchConfig

    config = SearchConfig(max_new_tokens=10, max_length=50)
    per_prompt = kv_bytes_per_prompt(trained_policy.model, config, 40)
    # layers x K,V x heads x dim x 4 bytes per token; prefix once, k x beams rows of 60 tokens
    layers, kv_heads, head_dim = ca.text_shapes(trained_policy.model)
    assert per_prompt == 2 * layers * kv_heads * head_dim * 4 * (40 + 5 * 5 * 60)
    assert kv_bytes_per_prompt(trained_policy.model, config, 40, shared=False) == (
        2 * layers * kv_heads * head_dim * 4 * 5 * 5 * (40 + 60)
    )
