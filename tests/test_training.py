"""DPO + LoRA training on a tiny LLaVA (engine/train/dpo.py)."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText, AutoProcessor, TrainerCallback
from transformers.utils import logging as hf_logging

from csr.engine.demo import tiny
from csr.engine.train.config import TrainConfig, TrainConfigError
from csr.engine.train.dpo import train_dpo
from csr.engine.train.dpo_data import (
    TokenPreferenceCollator,
    completion_logprob,
    implicit_reward_margins,
)
from csr.engine.train.lora import resolve_lora_targets, weights_hash
from tests.worlds import FAST_CONFIG, PROMPT, preference_world

# transformers/TRL deprecation chatter about their own internals.
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

TOTAL_STEPS = 12  # 4 pairs x 3 epochs, batch 1


@pytest.fixture(scope="module", autouse=True)
def quiet_transformers():
    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    yield
    if bars:
        hf_logging.enable_progress_bar()
    hf_logging.set_verbosity(level)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return preference_world(tmp_path_factory.mktemp("world"))


@pytest.fixture(scope="module")
def trained(world, tmp_path_factory):
    base, examples = world
    root = tmp_path_factory.mktemp("trained")
    return train_dpo(str(base), examples, root / "model", root / "ckpt", FAST_CONFIG, device="cpu")


class StepRecorder(TrainerCallback):
    def __init__(self, raise_at: int | None = None) -> None:
        self.steps: list[int] = []
        self.raise_at = raise_at

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append(state.global_step)
        if state.global_step == self.raise_at:
            raise KeyboardInterrupt(f"interrupted after step {state.global_step}")


# ------------------------------------------------------------------ config


def test_config_round_trips_through_a_dict():
    config = TrainConfig(beta=0.2, lora_r=16, bf16=False)
    data = json.loads(json.dumps(config.to_dict()))
    assert TrainConfig.from_dict(data) == config
    assert TrainConfig().to_dict()["learning_rate"] == 1e-7  # the released script's value


def test_config_unknown_keys_are_named():
    with pytest.raises(TrainConfigError, match=r"unknown training option\(s\): lr, warmup"):
        TrainConfig.from_dict({"beta": 0.1, "lr": 1e-5, "warmup": 3})


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("beta", "high", "beta must be a number"),
        ("epochs", 1.5, "epochs must be an integer"),
        ("lora_r", True, "lora_r must be an integer"),
        ("batch_size", 0, "batch_size must be > 0"),
        ("warmup_ratio", 1.5, r"warmup_ratio must be in \[0, 1\)"),
        ("lr_scheduler", "cosine_restarts", "lr_scheduler must be one of"),
        ("save_dtype", "int8", "save_dtype must be one of"),
        ("bf16", "yes", "bf16 must be true, false or unset"),
        ("sft_weight", -0.5, "sft_weight must be >= 0"),
    ],
)
def test_config_bad_values_are_refused(key, value, message):
    with pytest.raises(TrainConfigError, match=message):
        TrainConfig.from_dict({key: value})


def test_response_length_options_are_checked():
    assert TrainConfig().max_response_tokens == 1024 and TrainConfig().too_long == "skip"
    with pytest.raises(TrainConfigError, match="too_long must be one of"):
        TrainConfig(too_long="cut")
    with pytest.raises(TrainConfigError, match="reference must be one of"):
        TrainConfig(reference="model")


def test_a_response_over_the_limit_is_refused_not_cut(world, tmp_path):
    base, examples = world
    config = FAST_CONFIG.replace(max_response_tokens=2)
    with pytest.raises(ValueError, match="longer than max_response_tokens"):
        train_dpo(str(base), examples, tmp_path / "m", tmp_path / "c", config, device="cpu")
    assert not (tmp_path / "m").exists()


def policy_prompt(processor) -> str:
    from csr.engine.prompting import chat_prompt

    return chat_prompt(processor, PROMPT)


# ---------------------------------------------------------- model plumbing


def test_lora_targets_are_the_text_decoder_projections_only():
    tokenizer = tiny.train_word_tokenizer(["a b c"])
    model, _ = tiny.build_tiny_llava(tokenizer)
    _, matched = resolve_lora_targets(model, "language_model")
    # 2 decoder layers x (q, k, v, o, gate, up, down); the CLIP tower's own
    # q_proj/k_proj/v_proj must not be caught by the same names.
    assert len(matched) == 14
    assert all(name.startswith("model.language_model.layers.") for name in matched)
    assert any(".vision_tower." in n and n.endswith("q_proj") for n, _ in model.named_modules())
    _, some = resolve_lora_targets(model, "q_proj, v_proj")
    assert sorted(n.rsplit(".", 1)[-1] for n in some) == ["q_proj"] * 2 + ["v_proj"] * 2
    with pytest.raises(ValueError, match="matches no linear layer"):
        resolve_lora_targets(model, "qkv")


def test_dpo_batch_is_the_generation_prompt_then_the_stored_ids(world):
    """The collator encodes the prompt exactly as the search's Policy.encode
    does (BOS, chat template, expanded image tokens) and appends the stored
    response ids untouched; nothing is truncated."""
    from tokenizers.processors import TemplateProcessing

    from csr.engine.loading import Policy

    tokenizer = tiny.train_word_tokenizer(["describe the image .", "there is a red square ."])
    bos = tokenizer.bos_token_id
    tokenizer._tokenizer.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    model, processor = tiny.build_tiny_llava(tokenizer)
    policy = Policy("tiny", model, processor, tokenizer, "cpu", (tokenizer.convert_tokens_to_ids("."),),
                    tokenizer.eos_token_id)
    _, examples = world
    image = Image.open(examples[0].image_path).convert("RGB")
    generation_ids = policy.encode(image, "<image>\n" + PROMPT)["input_ids"][0].tolist()
    assert generation_ids[0] == bos
    chosen, rejected = [5, 6, 7, tokenizer.eos_token_id], [8, 9]
    batch = TokenPreferenceCollator(processor, tokenizer.pad_token_id)(
        [{"images": [examples[0].image_path], "prompt": PROMPT, "chosen_ids": chosen, "rejected_ids": rejected}]
    )
    for row, response in enumerate((chosen, rejected)):
        ids = batch["input_ids"][row][batch["attention_mask"][row].bool()].tolist()
        assert ids == generation_ids + response
        assert batch["input_ids"][row][batch["completion_mask"][row].bool()].tolist() == response


def test_weights_hash_ignores_sharding_and_sees_every_weight(tmp_path):
    tokenizer = tiny.train_word_tokenizer(["a b c"])
    model, _ = tiny.build_tiny_llava(tokenizer)
    model.save_pretrained(tmp_path / "one")
    model.save_pretrained(tmp_path / "many", max_shard_size="200KB")
    assert len(list((tmp_path / "many").glob("*.safetensors"))) > 1
    assert weights_hash(tmp_path / "one") == weights_hash(tmp_path / "many")
    with torch.no_grad():
        model.lm_head.weight[0, 0] += 1e-6
    model.save_pretrained(tmp_path / "changed")
    assert weights_hash(tmp_path / "changed") != weights_hash(tmp_path / "one")


def test_missing_image_fails_before_training(world, tmp_path):
    base, examples = world
    broken = [dataclasses.replace(examples[0], image_path=str(tmp_path / "nope.png"))]
    with pytest.raises(FileNotFoundError, match="nope.png"):
        train_dpo(str(base), broken, tmp_path / "m", tmp_path / "c", FAST_CONFIG, device="cpu")
    assert not (tmp_path / "m").exists()


# ---------------------------------------------------------------- training


@pytest.mark.slow
def test_trained_model_differs_where_it_should_and_generates(world, trained):
    base, examples = world
    assert trained.weights_hash == weights_hash(trained.model_dir)
    assert trained.weights_hash != weights_hash(base)
    assert trained.global_step == TOTAL_STEPS and trained.resumed_from_step is None

    before = load_file(base / "model.safetensors")
    after = load_file(trained.model_dir / "model.safetensors")
    assert before.keys() == after.keys()

    # (transformers saves LLaVA under its original checkpoint names, e.g.
    # language_model.model.layers.0..., so match on name parts.)
    def changed(*parts: str) -> bool:
        keys = [k for k in before if all(p in k for p in parts)]
        assert keys, parts
        return any(not torch.equal(before[k], after[k]) for k in keys)

    for proj in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        assert changed("language_model", ".layers.", proj), proj  # merged LoRA
    assert changed("multi_modal_projector")  # trained in full
    assert not changed("vision_tower")
    assert not changed("embed_tokens")
    assert not changed("lm_head")
    assert not changed("language_model", "norm")

    config = json.loads((trained.model_dir / "config.json").read_text())
    assert config["text_config"]["use_cache"] is True

    model = AutoModelForImageTextToText.from_pretrained(trained.model_dir).eval()
    processor = AutoProcessor.from_pretrained(trained.model_dir)
    inputs = processor(
        images=[Image.open(examples[0].image_path)],
        text=[policy_prompt(processor)],
        return_tensors="pt",
    )
    out = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    assert out.shape[1] > inputs["input_ids"].shape[1]


@pytest.mark.slow
def test_metrics_and_lora_config_are_reported(trained):
    assert [m["step"] for m in trained.metrics] == list(range(1, TOTAL_STEPS + 1))
    for key in ("loss", "learning_rate", "rewards/margins", "rewards/accuracies",
                "rewards/chosen", "rewards/rejected"):
        assert all(key in m for m in trained.metrics), key
    # Policy == reference before the first update: the sigmoid loss is log 2.
    assert trained.metrics[0]["loss"] == pytest.approx(0.6931, abs=1e-4)
    assert trained.metrics[0]["rewards/margins"] == 0.0
    assert trained.lora_config["r"] == FAST_CONFIG.lora_r
    assert trained.lora_config["targeted_module_count"] == 14
    assert trained.lora_config["modules_to_save"] == ["multi_modal_projector"]
    assert trained.train_seconds > 0


@pytest.mark.slow
def test_trl_scores_the_tokens_the_independent_check_scores(world, trained):
    # Step 1 runs before any update, so TRL's logged log-prob of the chosen
    # response is the base model's: it must equal our own forward pass on one
    # of the pairs, which pins TRL's view of prompt + image + completion + EOS.
    base, examples = world
    model = AutoModelForImageTextToText.from_pretrained(base).eval()
    processor = AutoProcessor.from_pretrained(base)
    ours = [
        completion_logprob(model, processor, Image.open(e.image_path).convert("RGB"), e.prompt, e.chosen_ids)
        for e in examples
    ]
    logged = trained.metrics[0]["logps/chosen"]
    assert min(abs(logged - x) for x in ours) < 1e-3, (logged, ours)


@pytest.mark.slow
def test_reference_from_the_tree_gives_the_recomputed_loss(world, trained, tmp_path):
    """With each pair's reference log-probs given (as the search stores them),
    TRL runs no reference forward; step 1 sees the same loss and log-probs."""
    base, examples = world
    model = AutoModelForImageTextToText.from_pretrained(base).eval()
    processor = AutoProcessor.from_pretrained(base)

    def logp(e, ids):
        return completion_logprob(model, processor, Image.open(e.image_path).convert("RGB"), e.prompt, ids)

    with_tree = [dataclasses.replace(e, chosen_ref_logp=logp(e, e.chosen_ids), rejected_ref_logp=logp(e, e.rejected_ids))
                 for e in examples]
    config = FAST_CONFIG.replace(epochs=1, save_steps=100)
    result = train_dpo(str(base), with_tree, tmp_path / "model", tmp_path / "ckpt", config, device="cpu")
    assert result.extra["reference"] == "tree" and trained.extra["reference"] == "recompute"
    first, recomputed = result.metrics[0], trained.metrics[0]
    assert first["loss"] == pytest.approx(recomputed["loss"], abs=1e-4)
    assert first["logps/chosen"] == pytest.approx(recomputed["logps/chosen"], abs=1e-4)
    assert first["rewards/margins"] == pytest.approx(0.0, abs=1e-4)


@pytest.mark.slow
def test_dpo_raises_the_implicit_reward_margin(world, trained):
    base, examples = world
    beta = FAST_CONFIG.beta
    before = implicit_reward_margins(base, base, examples, beta, device="cpu")
    after = implicit_reward_margins(trained.model_dir, base, examples, beta, device="cpu")
    assert before == [0.0] * len(examples)
    assert sum(after) / len(after) > 0.05
    assert sum(m > 0 for m in after) >= len(after) - 1


@pytest.mark.slow
def test_sft_weight_holds_up_the_chosen_likelihood(world, trained, tmp_path):
    base, examples = world
    with_sft = train_dpo(str(base), examples, tmp_path / "model", tmp_path / "ckpt",
                         FAST_CONFIG.replace(sft_weight=1.0), device="cpu")

    def chosen_logprob(model_dir) -> float:
        model = AutoModelForImageTextToText.from_pretrained(model_dir).eval()
        processor = AutoProcessor.from_pretrained(model_dir)
        return sum(completion_logprob(model, processor, Image.open(e.image_path).convert("RGB"), e.prompt,
                                      e.chosen_ids)
                   for e in examples)

    assert chosen_logprob(with_sft.model_dir) > chosen_logprob(trained.model_dir)
    # ... while the preference is still learnt.
    margins = implicit_reward_margins(with_sft.model_dir, base, examples, FAST_CONFIG.beta, device="cpu")
    assert sum(margins) / len(margins) > 0.05, margins


@pytest.mark.slow
def test_training_is_deterministic(world, trained, tmp_path):
    base, examples = world
    again = train_dpo(str(base), examples, tmp_path / "model", tmp_path / "ckpt", FAST_CONFIG, device="cpu")
    assert again.weights_hash == trained.weights_hash
    assert [m["loss"] for m in again.metrics] == [m["loss"] for m in trained.metrics]


@pytest.mark.slow
def test_interrupted_run_resumes_from_its_checkpoint(world, trained, tmp_path):
    base, examples = world
    out, ckpt = tmp_path / "model", tmp_path / "ckpt"
    first = StepRecorder(raise_at=5)
    with pytest.raises(KeyboardInterrupt):
        train_dpo(str(base), examples, out, ckpt, FAST_CONFIG, device="cpu", callbacks=[first])
    assert first.steps == [1, 2, 3, 4, 5]
    assert not out.exists()
    # save_steps=2: step 4 is the last checkpoint; fake a crash while step 6's
    # checkpoint was being written (no trainer_state.json yet).
    assert (ckpt / "checkpoint-4" / "trainer_state.json").is_file()
    shutil.copytree(ckpt / "checkpoint-4", ckpt / "checkpoint-6")
    (ckpt / "checkpoint-6" / "trainer_state.json").unlink()

    second = StepRecorder()
    resumed = train_dpo(str(base), examples, out, ckpt, FAST_CONFIG, device="cpu", callbacks=[second])
    assert resumed.resumed_from_step == 4
    assert second.steps == list(range(5, TOTAL_STEPS + 1))  # continued, not restarted
    # Optimizer, scheduler, data order and RNG (LoRA dropout) all restored:
    # bit-identical to the uninterrupted run on CPU.
    assert resumed.weights_hash == trained.weights_hash
    assert [m["loss"] for m in resumed.metrics] == [m["loss"] for m in trained.metrics]


@pytest.mark.slow
def test_checkpoints_of_another_run_are_refused(world, trained):
    base, examples = world
    ckpt = Path(trained.model_dir).parent / "ckpt"
    other = FAST_CONFIG.replace(beta=0.5)
    with pytest.raises(ValueError, match="different training run"):
        train_dpo(str(base), examples, ckpt.parent / "other", ckpt, other, device="cpu")
    with pytest.raises(ValueError, match="different training run"):
        train_dpo(str(base), examples[:-1], ckpt.parent / "other", ckpt, FAST_CONFIG, device="cpu")
    assert not (ckpt.parent / "other").exists()


@pytest.mark.slow
def test_a_finished_run_resumes_to_the_same_model(world, trained):
    # Checkpoint frequency is bookkeeping: changing it does not block resuming.
    base, examples = world
    ckpt = Path(trained.model_dir).parent / "ckpt"
    config = FAST_CONFIG.replace(save_steps=5)
    again = train_dpo(str(base), examples, ckpt.parent / "again", ckpt, config, device="cpu")
    assert again.resumed_from_step == TOTAL_STEPS and again.global_step == TOTAL_STEPS
    assert again.weights_hash == trained.weights_hash


@pytest.mark.slow
def test_projector_learning_rate_zero_freezes_the_projector(world, tmp_path):
    base, examples = world
    config = FAST_CONFIG.replace(projector_learning_rate=0.0, epochs=1, save_steps=100)
    result = train_dpo(str(base), examples, tmp_path / "model", tmp_path / "ckpt", config, device="cpu")
    assert result.lora_config["modules_to_save"] == []
    before = load_file(base / "model.safetensors")
    after = load_file(result.model_dir / "model.safetensors")
    for key in before:
        if "multi_modal_projector" in key:
            assert torch.equal(before[key], after[key]), key
    assert result.weights_hash != weights_hash(base)
