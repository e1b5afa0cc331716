"""Models saved to disk load back through the same path a user's model takes."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from csr.engine.demo import tiny
from csr.engine.errors import CsrError, ModelLoadError
from csr.engine.loading import (
    Policy,
    find_sentence_end_ids,
    load_clip,
    load_policy,
)
from csr.engine.prompting import FALLBACK_PROMPT
from tests.worlds import PROMPT


def test_policy_loads_from_a_saved_directory(policy, tiny_llava_dir, tiny_tokenizer, colour_images):
    assert policy.name == str(tiny_llava_dir)
    assert not policy.model.training
    assert policy.sentence_end_ids == (tiny_tokenizer.convert_tokens_to_ids("."),)
    assert policy.eos_token_id == tiny_tokenizer.eos_token_id
    assert policy.stop_ids[0] == policy.eos_token_id
    prompt = policy.build_prompt("<image>\n" + PROMPT)
    assert prompt == f"USER: <image> {PROMPT} ASSISTANT:"  # the chat template, image placed once
    inputs = policy.encode(colour_images["red"], PROMPT)
    image_token = tiny_tokenizer.convert_tokens_to_ids(tiny.IMAGE_TOKEN)
    # the processor expands the image placeholder to one token per patch (+ CLS)
    assert int((inputs["input_ids"] == image_token).sum()) == (32 // 8) ** 2 + 1

    # the weights are the saved ones: same logits as the model built in memory
    model, _ = tiny.build_tiny_llava(tiny_tokenizer, seed=0)
    with torch.inference_mode():
        want = model(**inputs).logits
        got = policy.model(**inputs).logits
    assert torch.allclose(got, want, atol=1e-5)


def test_prompt_falls_back_to_llava_format_without_chat_template(policy):
    bare = Policy(
        name="bare",
        model=policy.model,
        processor=SimpleNamespace(chat_template=None),
        tokenizer=policy.tokenizer,
        device="cpu",
        sentence_end_ids=policy.sentence_end_ids,
        eos_token_id=policy.eos_token_id,
    )
    assert bare.build_prompt("What is this?\n<image>") == FALLBACK_PROMPT.format(prompt="What is this?")
    assert bare.build_prompt("What is this?") == "USER: <image>\nWhat is this? ASSISTANT:"


class _Vocab:
    """The part of a tokenizer find_sentence_end_ids uses, with a BPE-like vocabulary."""

    pieces = ["<s>", ".", " .", ".\n", "Mr.", "...", "cat", "</s>"]
    all_special_ids = [0, 7]

    def __len__(self) -> int:
        return len(self.pieces)

    def batch_decode(self, ids, skip_special_tokens=False):
        return ["".join(self.pieces[i] for i in row) for row in ids]


def test_sentence_end_ids_are_full_stops_only():
    assert find_sentence_end_ids(_Vocab()) == (1, 2, 3)  # not "Mr." or "..."


def test_word_level_tokenizer_has_one_full_stop(tiny_tokenizer):
    assert find_sentence_end_ids(tiny_tokenizer) == (tiny_tokenizer.convert_tokens_to_ids("."),)


def test_missing_policy_directory_is_a_clear_error(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelLoadError, match="model directory not found") as info:
        load_policy(str(missing))
    assert str(missing) in str(info.value)
    assert isinstance(info.value, CsrError)


def test_directory_without_a_model_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="could not load a vision-language model") as info:
        load_policy(str(tmp_path / "empty"))
    assert str(tmp_path / "empty") in str(info.value)


def test_clip_loads_from_local_dir(clip_scorer, tiny_clip_dir, colour_images):
    model, _ = tiny.build_tiny_clip(seed=0)
    embedding = clip_scorer.encode_image(colour_images["blue"])
    assert embedding.shape == (32,)
    assert float(embedding.norm()) == pytest.approx(1.0, abs=1e-5)
    # the saved weights came back: same embedding as the in-memory model
    with torch.inference_mode():
        want = model.encode_image(clip_scorer.preprocess(colour_images["blue"])[None], normalize=True)[0]
    assert torch.allclose(embedding, want, atol=1e-5)


def test_clip_score_is_clamped_scaled_cosine_in_one_batch(clip_scorer, colour_images):
    texts = ["a red square", "blue", "the cat sits on the mat", "dog", "there is a big green circle", "x " * 200]
    embedding = clip_scorer.encode_image(colour_images["red"])
    got = clip_scorer.score(embedding, texts)
    model, tokenizer = clip_scorer.model, clip_scorer.tokenizer
    raw = []
    with torch.inference_mode():
        for text in texts:
            e = model.encode_text(tokenizer([text]))[0]  # truncated at 77 tokens
            raw.append(100 * float(e @ embedding / e.norm()))
    assert got == pytest.approx([max(r, 0.0) for r in raw], abs=1e-3)
    assert any(r > 0 for r in raw) and any(r < 0 for r in raw)  # both sides of the clamp were exercised
    assert clip_scorer.score(embedding, []) == []


def test_clip_errors_are_clear(tmp_path):
    with pytest.raises(ModelLoadError, match="CLIP directory not found"):
        load_clip(f"local-dir:{tmp_path / 'nothing'}", None)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="open_clip_config.json"):
        load_clip(f"local-dir:{tmp_path / 'empty'}", None)
    with pytest.raises(ModelLoadError, match="unknown CLIP model 'ViT-Nope-99'"):
        load_clip("ViT-Nope-99", "openai")
