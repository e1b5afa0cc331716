"""The `reference-code` preset against the authors' released code, one rule at
a time (inference_csr/sample.py, score.py, utils.py), each on a case where
csr's own rule (the `paper` preset's) does something else, each overridable
and recorded with the iteration.

The hand-built cases run the real tree logic (`run_sentence_search`) and the
real token-level search (`group_beam_search`) over a Llama-style tokenizer;
the "model" is a table of next-token logits, so each case says what it tests.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from csr.engine.loading import Policy, find_sentence_end_ids, period_token_id
from csr.engine.prompting import LLAVA_V1_SYSTEM, chat_prompt
from csr.engine.search import degenerate
from csr.engine.search.beam_search import EOS, SENTENCE_END, TokenBeam, group_beam_search
from csr.engine.search.config import PRESET_SEARCH_DEFAULTS, RECORDED_BEFORE, SearchConfig
from csr.engine.search.expansion import PromptPrefix
from csr.engine.search.sentence_level import DEGENERATE_ANCESTOR
from csr.engine.search.sentence_search import run_sentence_search, search_beam_settings
from tests.llama_tokenizer import llama_style_tokenizer, piece_ids

pytestmark = pytest.mark.usefixtures("one_torch_thread")

RULES = ("prompt_template", "eos_rule", "max_length_unit", "prune_degenerate", "sentence_end")
RELEASE = {"prompt_template": "llava-v1", "eos_rule": "contained", "max_length_unit": "characters",
           "prune_degenerate": "after-search", "sentence_end": "period-token"}
PROMPT = "Describe the image."


@pytest.fixture(scope="module")
def tok():
    # " ." is frequent enough that "▁." becomes a piece, as in Llama's vocabulary (869 beside 29889).
    return llama_style_tokenizer(["a red ball . a cat sat . The cat is red . A dog sat on a mat ."] * 12)


@pytest.fixture(scope="module")
def policy(tok):
    processor = SimpleNamespace(image_token="<image>", chat_template=None)
    return Policy(name="table", model=None, processor=processor, tokenizer=tok, device="cpu",
                  sentence_end_ids=find_sentence_end_ids(tok), eos_token_id=tok.eos_token_id)


def config(preset: str = "paper", **changes) -> SearchConfig:
    # One token beam, one group: the token-level search is then a plain beam of one.
    return SearchConfig(**{"preset": preset, "num_token_beams": 1, "num_beam_groups": 1, "max_new_tokens": 20,
                           **changes})


# ------------------------------------------------------------------ settings


def test_reference_code_takes_every_release_rule_and_paper_keeps_csrs():
    released = SearchConfig(preset="reference-code")
    assert {k: getattr(released, k) for k in RULES} == RELEASE
    assert {k: getattr(SearchConfig(), k) for k in RULES} == RECORDED_BEFORE
    assert set(RULES) <= set(PRESET_SEARCH_DEFAULTS["paper"]) and set(RULES) <= set(PRESET_SEARCH_DEFAULTS["reference-code"])


@pytest.mark.parametrize("rule", RULES)
def test_each_rule_is_overridable_and_recorded(rule):
    released = SearchConfig(preset="reference-code")
    overridden = SearchConfig(preset="reference-code", **{rule: RECORDED_BEFORE[rule]})
    assert getattr(overridden, rule) == RECORDED_BEFORE[rule]
    assert all(getattr(overridden, k) == RELEASE[k] for k in RULES if k != rule)
    # the frozen config reads back as it was searched, the override included
    assert released.to_dict()[rule] == RELEASE[rule]
    for chosen in (released, overridden, SearchConfig(**{rule: RELEASE[rule]})):
        assert SearchConfig.from_recorded(chosen.to_dict()) == chosen
    assert getattr(SearchConfig.from_recorded(overridden.to_dict()).replace(lam=0.5), rule) == RECORDED_BEFORE[rule]


def test_a_record_made_before_the_rules_existed_reads_back_as_it_was_searched():
    old_reference_record = {k: v for k, v in SearchConfig(preset="reference-code").to_dict().items() if k not in RULES}
    assert {k: getattr(SearchConfig.from_recorded(old_reference_record), k) for k in RULES} == RECORDED_BEFORE
    # a paper study's record (and so its hash) does not change
    assert not set(RULES) & set(SearchConfig().to_dict())


# ------------------------------------------------------------------ prompt


def test_llava_v1_is_the_release_prompt(policy):
    # utils.py get_prompts: conv_templates['v1'] (conv_vicuna_v1, SeparatorStyle.TWO, sep " "),
    # one user message "<image>\n" + question, an open assistant turn; sample.py strips "<image>" first.
    expected = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
                "helpful, detailed, and polite answers to the user's questions. USER: <image>\nWhat is it? ASSISTANT:")
    assert policy.build_prompt("<image>\nWhat is it?", "llava-v1") == expected
    assert policy.build_prompt("What is it?\n<image>", "llava-v1") == expected
    assert LLAVA_V1_SYSTEM not in policy.build_prompt("What is it?")  # csr's "chat": no system sentence
    with pytest.raises(ValueError, match="unknown prompt template"):
        chat_prompt(policy.processor, "x", "vicuna")


def test_search_and_training_use_the_iterations_template(trained_policy, colour_images):
    from csr.engine.prompting import encode_prompts
    from csr.engine.train.dpo_data import completion_logprob

    image = colour_images["red"]
    chat = PromptPrefix(trained_policy, image, PROMPT)
    v1 = PromptPrefix(trained_policy, image, PROMPT, "llava-v1")
    encoded = encode_prompts(trained_policy.processor, [image], [PROMPT], "llava-v1")
    assert v1.length == encoded["input_ids"].shape[1] > chat.length
    # what the search scored under llava-v1 is what training scores under it, not under "chat"
    cfg = SearchConfig(max_new_tokens=6, max_length=12, prompt_template="llava-v1", num_beams=1)
    from csr.engine.search.sentence_search import sentence_beam_search

    clip = SimpleNamespace(encode_image=lambda _: None, raw_scores=lambda _e, texts: [20.0] * len(texts))
    result = sentence_beam_search(trained_policy, clip, image, PROMPT, cfg)
    first = next(r for r in result.records if r.exclusion_reason is None)
    model, processor = trained_policy.model, trained_policy.processor
    trained = completion_logprob(model, processor, image, PROMPT, first.token_ids, "llava-v1")
    assert trained == pytest.approx(first.logprob_sum, abs=1e-3)
    assert completion_logprob(model, processor, image, PROMPT, first.token_ids) != pytest.approx(trained, abs=1e-3)


def test_training_examples_carry_the_template(tmp_path, trained_policy, colour_images):
    from csr.engine.iterations import preference_examples
    from csr.engine.train.dpo_data import TokenPreferenceCollator, preference_dataset

    path = tmp_path / "red.png"
    colour_images["red"].save(path)
    row = {"image_root": str(tmp_path), "image_path": "red.png", "prompt": PROMPT, "chosen_token_ids": [5, 6],
           "rejected_token_ids": [7], "chosen_logprob_sum": -1.0, "rejected_logprob_sum": -2.0}
    from csr.engine.prompting import encode_prompts

    prompts = {}
    for template in ("chat", "llava-v1"):
        examples = preference_examples([row], "unused", prompt_template=template)
        assert examples[0].prompt_template == template
        batch = TokenPreferenceCollator(trained_policy.processor, 0)(list(preference_dataset(examples, True)))
        prompt = encode_prompts(trained_policy.processor, [colour_images["red"]], [PROMPT], template)["input_ids"][0]
        assert batch["input_ids"][0].tolist() == prompt.tolist() + [5, 6]  # the chosen row: prompt, response
        prompts[template] = prompt.tolist()
    assert prompts["chat"] != prompts["llava-v1"]


# ------------------------------------------------------ a table of logits as the model


def table_expand(tok, chain: dict[int, int], settings):
    """`expand` over a model whose next token depends only on the last one:
    `chain[a] = b` makes b by far the likeliest after a (start: after BOS)."""
    vocab = len(tok)
    logits = torch.full((vocab, vocab), -8.0)
    for a, b in chain.items():
        logits[a, b] = 8.0
    bos = tok.bos_token_id

    def expand(partials, caps):
        first = torch.stack([logits[p[-1] if p else bos] for p in partials])
        state = {"last": None}

        def step(rows, tokens):
            state["last"] = tokens
            return logits[tokens]

        return group_beam_search(first, step, caps, settings)

    return expand


def chain_of(ids: list[int], bos: int) -> dict[int, int]:
    assert len(set(ids)) == len(ids), "a table model needs each token once"
    return dict(zip([bos, *ids[:-1]], ids, strict=True))


def no_clip(texts):
    return [30.0] * len(texts)


def enc(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False).input_ids


def test_eos_stops_nothing_and_a_candidate_holding_it_is_final(tok, policy):
    ids = enc(tok, "A cat") + [tok.eos_token_id] + enc(tok, "sat.")
    chain = chain_of(ids, tok.bos_token_id)
    trees = {}
    for rule in ("stop", "contained"):
        cfg = config("reference-code", eos_rule=rule)
        trees[rule] = run_sentence_search(policy, cfg, table_expand(tok, chain, search_beam_settings(policy, cfg)),
                                          no_clip, PROMPT)
    stop, contained = trees["stop"].records[0], trees["contained"].records[0]
    # csr: EOS ends the sentence and the response
    assert stop.token_ids == ids[: ids.index(tok.eos_token_id) + 1] and stop.finish_reason == EOS
    # the release: eos_token_id is the period, so the beam runs on to "." and is final for holding </s>
    assert contained.token_ids == ids and contained.is_final and contained.finish_reason == EOS
    assert contained.text == "A cat sat." and [r.text for r in trees["contained"].responses] == ["A cat sat."]
    assert search_beam_settings(policy, config("reference-code")).stop_ids == (period_token_id(tok),)


def test_sentence_end_is_the_one_period_token(tok, policy):
    spaced_stop = tok.convert_tokens_to_ids("▁.")
    assert spaced_stop in policy.sentence_end_ids and spaced_stop != period_token_id(tok)
    ids = enc(tok, "A cat") + [spaced_stop] + enc(tok, "The dog.") + [tok.eos_token_id]
    chain = chain_of(ids, tok.bos_token_id)
    first = {}
    for rule in ("full-stops", "period-token"):
        cfg = config("reference-code", sentence_end=rule, eos_rule="stop")
        result = run_sentence_search(policy, cfg, table_expand(tok, chain, search_beam_settings(policy, cfg)),
                                     no_clip, PROMPT)
        first[rule] = result.records[0]
    assert first["full-stops"].token_ids == ids[: ids.index(spaced_stop) + 1]
    assert first["full-stops"].finish_reason == SENTENCE_END
    # the release ends a sentence at 29889 only: "▁." does not end it
    assert first["period-token"].token_ids == ids[: -1]
    assert first["period-token"].text == "A cat . The dog."


def test_max_length_counts_decoded_characters_of_prompt_and_response(tok, policy):
    ids = enc(tok, "A cat sat.") + [tok.eos_token_id]
    chain = chain_of(ids, tok.bos_token_id)
    prompt_ids = tok(policy.build_prompt(PROMPT, "llava-v1")).input_ids
    first_sentence = ids[: ids.index(period_token_id(tok)) + 1]
    chars = len(tok.decode(prompt_ids + first_sentence))  # sample.py: len(tokenizer.decode(outputs.sequences[j]))
    assert chars > 100 > len(first_sentence)

    def first_record(**changes):
        cfg = config("reference-code", eos_rule="stop", **changes)
        result = run_sentence_search(policy, cfg, table_expand(tok, chain, search_beam_settings(policy, cfg)),
                                     no_clip, PROMPT)
        return result.records[0]

    assert first_record(max_length=chars).is_final  # final at max_length characters
    assert not first_record(max_length=chars + 1).is_final
    # csr counts response tokens: 100 is far off
    assert not first_record(max_length=100, max_length_unit="response-tokens").is_final
    assert first_record(max_length=100).is_final


# --------------------------------------------------- hand-built trees: one sentence a candidate


def scripted(tok, eos: int, children: dict[str, list[tuple[str, float]]]):
    """`expand` returning, for each partial response (by its decoded text), the
    listed (sentence, beam score) candidates; a sentence ending in "|" ends the response."""

    def expand(partials, caps):
        out = []
        for part in partials:
            beams = []
            for sentence, score in children[tok.decode(part)]:
                final = sentence.endswith("|")
                ids = piece_ids(tok, sentence.rstrip("|")) + ([eos] if final else [])
                beams.append(TokenBeam(ids, [-0.5] * len(ids), EOS if final else SENTENCE_END, score))
            out.append(beams)
        return out

    return expand


def test_degenerate_candidates_hold_their_search_slots(tok, policy):
    # depth 0: five siblings, the best by beam score degenerate (a repeated word)
    children = {
        "": [("a a a a a a a.", -0.1), ("A cat sat.", -0.2), ("A dog sat.", -0.3), ("A red ball.", -0.4),
             ("The cat is red.", -0.5)],
    }
    for text, _ in children[""]:
        children[text] = [(" It ends.|", -0.1)]
    results = {}
    for rule in ("before-select", "after-search"):
        cfg = config("reference-code", prune_degenerate=rule, num_token_beams=5, num_beam_groups=5)
        results[rule] = run_sentence_search(policy, cfg, scripted(tok, tok.eos_token_id, children), no_clip, PROMPT)
    first = {rule: [r for r in res.records if r.depth == 0] for rule, res in results.items()}
    assert first["after-search"][0].exclusion_reason == degenerate.REPEATED_WORD
    # the release keeps new_nodes[:1] + new_nodes[-2:] by node.score, the degenerate one among them
    kept = {rule: [r.text for r in recs if r.is_kept] for rule, recs in first.items()}
    assert kept["after-search"] == ["a a a a a a a.", "A red ball.", "The cat is red."]
    # csr drops it first: four left, fewer than num_beams, all kept
    assert kept["before-select"] == ["A cat sat.", "A dog sat.", "A red ball.", "The cat is red."]
    # its subtree is searched, then dropped: never a response
    below = [r for r in results["after-search"].records if r.parent_node == first["after-search"][0].node]
    assert below and all(r.exclusion_reason == DEGENERATE_ANCESTOR and not r.is_kept for r in below)
    assert len(results["after-search"].responses) == 2
    assert all("a a a" not in r.text for r in results["after-search"].responses)


def test_too_short_counts_the_blanks_clean_text_leaves():
    # score.py: len(extract_new_text(...)) = len(clean_text(new_text.strip())) < 4
    assert degenerate.released_exclusion_reason("abc \u2605") is None  # clean_text -> "abc " (4)
    assert degenerate.released_exclusion_reason(" abc ") == degenerate.TOO_SHORT
    assert degenerate.released_exclusion_reason("\u2605 ab") == degenerate.TOO_SHORT  # " ab" (3)


def test_select_by_sentence_reward_or_path_reward(tok, policy):
    # lambda = 1: R(s) is the CLIP score; k = 2 keeps the top 1 and the bottom 1.
    clip = {"A red ball.": 90.0, "A cat sat.": 50.0, "A dog sat.": 10.0,
            "It is red.": 5.0, "It is big.": 6.0, "It sat.": 60.0, "It ran.": 4.0, "End.": 1.0}
    children = {
        "": [("A red ball.", -1.0), ("A cat sat.", -1.0), ("A dog sat.", -1.0)],
        "A red ball.": [(" It is red.", -1.0), (" It is big.", -1.0)],
        "A dog sat.": [(" It sat.", -1.0), (" It ran.", -1.0)],
    }
    for parent in ("A red ball. It is red.", "A red ball. It is big.", "A dog sat. It sat.", "A dog sat. It ran."):
        children[parent] = [(" End.|", -1.0)]

    def kept_at_depth_1(select_by):
        cfg = config("paper", select_by=select_by, lam=1, num_beams=2, num_token_beams=2, num_beam_groups=2)
        result = run_sentence_search(policy, cfg, scripted(tok, tok.eos_token_id, children),
                                     lambda texts: [clip[t] for t in texts], PROMPT)
        return sorted(r.text for r in result.records if r.depth == 1 and r.is_kept)

    # the path's cumulative reward: 90 + 6 = 96 on top; the sentence's own R(s): 60 on top
    assert kept_at_depth_1("reward") == [" It is big.", " It ran."]
    assert kept_at_depth_1("sentence-reward") == [" It ran.", " It sat."]


@pytest.mark.parametrize("recorded, template", [
    (SearchConfig(preset="reference-code").to_dict(), "llava-v1"),
    (SearchConfig(preset="reference-code", prompt_template="chat").to_dict(), "chat"),
    # an iteration recorded before the setting existed was searched with "chat"
    ({k: v for k, v in SearchConfig(preset="reference-code").to_dict().items() if k not in RULES}, "chat"),
])
def test_train_reads_the_template_the_iteration_recorded(tmp_path, recorded, template):
    from csr.engine.iterations import _prompt_template
    from csr.storage import iterations
    from csr.storage.store import Store, create_store
    from csr.storage.versions import register_base_model

    engine, _ = create_store(f"sqlite:///{tmp_path / 'csr.db'}")
    try:
        with engine.begin() as conn:
            register_base_model(conn, str(tmp_path), "local-dir:none", None)
        iterations.start_iteration(engine, 1, "reference-code", {"search": recorded, "policy_version": 0,
                                                           "policy_path": str(tmp_path)})
        assert _prompt_template(Store(engine), 1) == template
    finally:
        engine.dispose()
