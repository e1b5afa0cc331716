"""The evaluation's own greedy decoder against transformers' `generate`:
token for token on tiny LLaVA models with both tokenizers, prompts of
different lengths in one batch, rows that end at different steps, rows
refilled from the queue; the fallback to `generate` and `csr eval --decoder`."""

from __future__ import annotations

import random

import pytest
import torch

from csr.engine.demo import tiny
from csr.engine.evaluate.benchmarks import policy_generator
from csr.engine.evaluate.decode import DecodeStats, greedy_decode, unsupported
from csr.engine.loading import load_policy
from tests import worlds
from tests.cli_runner import invoke_csr
from tests.llama_tokenizer import llama_style_tokenizer
from tests.test_evaluations import _coco, _invoke, tiny_store  # noqa: F401

# Prompts of different token lengths, so that one batch mixes prefix lengths.
PROMPTS = ["describe", "what colour is the square ?", "a", "describe the image in detail please ."]


def _tokenizer(kind: str):
    if kind == "word":
        return worlds.word_tokenizer()
    rng = random.Random(0)
    return llama_style_tokenizer([worlds.caption(rng, c) for _ in range(40) for c in ("red", "green", "blue")])


def _chaotic_llava(kind: str, directory, seed: int = 0):
    """A tiny LLaVA whose language weights are drawn wide enough that greedy
    decoding wanders over the vocabulary (the plain random init repeats one
    token), saved and loaded back as a user's model is."""
    model, processor = tiny.build_tiny_llava(_tokenizer(kind), seed=seed)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if weight.dim() == 2 and not name.startswith("model.vision_tower"):
                weight.copy_(torch.randn(weight.shape, generator=generator) * 0.15)
    return load_policy(str(tiny.save_pretrained(model, processor, directory)))


def _work(n: int):
    images = list(worlds.colour_images().values())
    return [images[i % len(images)] for i in range(n)], [PROMPTS[i % len(PROMPTS)] for i in range(n)]


def _generate(policy, images, prompts, max_new_tokens, batch_size):
    """What the evaluation's `generate` path returns, as token ids, batch by batch."""
    policy.tokenizer.padding_side = "left"
    out = []
    for start in range(0, len(prompts), batch_size):
        chunk = slice(start, start + batch_size)
        inputs = policy.processor(text=[policy.build_prompt(p) for p in prompts[chunk]], images=images[chunk],
                                  return_tensors="pt", padding=True)
        with torch.no_grad():
            ids = policy.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                        pad_token_id=policy.tokenizer.pad_token_id)
        out += ids[:, inputs["input_ids"].shape[1]:].tolist()
    return out


def _until_stop(row: list[int], stops: set[int]) -> list[int]:
    for i, token in enumerate(row):
        if token in stops:
            return row[: i + 1]
    return row


def _stop_midway(policy, images, prompts, max_new_tokens) -> int:
    """An EOS id for the test: a token the rows first reach at the most
    different steps while some row never reaches it, so that rows end at
    different steps and one runs to `max_new_tokens` (the config's own EOS
    rarely comes from random weights)."""
    rows = _generate(policy, images, prompts, max_new_tokens, len(prompts))
    first: dict[int, list[int]] = {}
    for row in rows:
        seen = set()
        for step, token in enumerate(row[:-1]):
            if token not in seen:
                seen.add(token)
                first.setdefault(token, []).append(step)
    candidates = [token for token, steps in first.items() if len(steps) < len(rows)]
    return max(candidates, key=lambda token: (len(set(first[token])), -token))


@pytest.mark.parametrize(("kind", "attention"), [("word", "sdpa"), ("llama-style", "sdpa"), ("word", "eager")])
def test_decoder_equals_generate_token_for_token(tmp_path, kind, attention):
    policy = _chaotic_llava(kind, tmp_path / "model")
    policy.model.set_attn_implementation(attention)
    assert policy.model.config.get_text_config()._attn_implementation == attention
    assert unsupported(policy.model) is None
    images, prompts = _work(11)
    max_new = 24
    policy.model.generation_config.eos_token_id = _stop_midway(policy, images, prompts, max_new)
    stops = {policy.model.generation_config.eos_token_id}

    expected = [_until_stop(row, stops) for row in _generate(policy, images, prompts, max_new, 4)]
    stats = DecodeStats()
    found = greedy_decode(policy, images, prompts, max_new, batch_size=4, stats=stats)

    assert found == expected
    lengths = {len(row) for row in found}
    assert len(lengths) >= 3 and max_new in lengths and min(lengths) < max_new  # rows end at different steps
    # Finished rows leave: fewer rows forwarded than 4 rows for every step of every batch.
    assert stats.rows_forwarded < sum(len(row) for row in found) + 4 * stats.forward_passes
    assert stats.new_tokens == sum(len(row) for row in found)


@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_batch_size_does_not_change_the_tokens(tmp_path, batch_size):
    policy = _chaotic_llava("word", tmp_path / "model", seed=2)
    images, prompts = _work(7)
    reference = greedy_decode(policy, images, prompts, 10, batch_size=7)
    assert greedy_decode(policy, images, prompts, 10, batch_size=batch_size) == reference
    assert greedy_decode(policy, images, prompts, 1, batch_size=batch_size) == [row[:1] for row in reference]


def test_engine_generator_gives_the_texts_of_generate(tmp_path):
    _chaotic_llava("llama-style", tmp_path / "model", seed=3)
    path = str(tmp_path / "model")
    images, prompts = _work(6)
    notes: list[str] = []
    engine = policy_generator(path, batch_size=4, decoder="engine", note=notes.append)
    plain = policy_generator(path, batch_size=4, decoder="generate")
    texts = engine(images, prompts, 12)
    assert texts == plain(images, prompts, 12)
    assert not notes and any(texts)


def test_unsupported_generation_settings_fall_back_to_generate(tmp_path):
    policy = _chaotic_llava("word", tmp_path / "model", seed=4)
    policy.model.generation_config.repetition_penalty = 1.3
    directory = tmp_path / "penalised"
    policy.model.save_pretrained(directory)
    policy.processor.save_pretrained(directory)
    loaded = load_policy(str(directory))
    assert "repetition_penalty" in unsupported(loaded.model)

    notes: list[str] = []
    engine = policy_generator(str(directory), batch_size=3, decoder="engine", note=notes.append)
    plain = policy_generator(str(directory), batch_size=3, decoder="generate")
    images, prompts = _work(4)
    assert engine(images, prompts, 8) == plain(images, prompts, 8)
    assert len(notes) == 1 and "repetition_penalty" in notes[0] and "generate" in notes[0]


def test_eval_decoder_option_keeps_the_stored_evaluation(tiny_store, tmp_path):  # noqa: F811 (fixture)
    instances, images = _coco(tmp_path)
    args = ("eval", "chair", "--model-version", "0", "--annotations", instances, "--images", images,
            "--max-new-tokens", "5")
    first = _invoke(tiny_store, *args)
    assert first.exit_code == 0, first.output
    assert "(already stored)" not in first.output
    # The decoder is not a setting: both give the same tokens, so the row is found, not recomputed.
    again = _invoke(tiny_store, *args, "--decoder", "generate")
    assert again.exit_code == 0 and "(already stored)" in again.output
    bad = invoke_csr(*args, "--decoder", "beam", db=tiny_store)
    assert bad.returncode != 0 and bad.stderr.strip() == "csr: error: unknown decoder 'beam'; choose one of engine, generate"
