"""DPO with the prompt and image run once per pair (engine/train/prefix_shared.py)
against TRL's concatenated forward: the same batch fields, loss, metrics and
LoRA / projector gradients within float32 tolerance, on a tiny LLaVA and a
tiny LLaVA-NeXT."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor
from transformers.utils import logging as hf_logging

from csr.engine.demo import tiny
from csr.engine.train import prefix_shared
from csr.engine.train.config import TrainConfig
from csr.engine.train.dpo import make_trainer, train_dpo
from csr.engine.train.dpo_data import PreferenceExample, TokenPreferenceCollator, preference_dataset
from csr.engine.train.lora import lora_setup
from tests.worlds import preference_world, word_tokenizer

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

# No dropout: the two forwards draw different dropout masks.
CONFIG = TrainConfig(lora_r=8, lora_alpha=16, lora_dropout=0.0, beta=0.5, seed=0, gradient_checkpointing=True)


@pytest.fixture(scope="module", autouse=True)
def quiet_transformers():
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    yield
    hf_logging.set_verbosity(level)


def tiny_llava_next(directory: Path) -> Path:
    """A random LLaVA-NeXT (anyres: a base view and up to 4 crops of 32 px,
    each 16 image tokens; grouped-query attention) saved to `directory`."""
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessor,
        LlavaNextProcessor,
    )

    tokenizer = word_tokenizer()
    grid = [[32, 64], [64, 32], [64, 64]]
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=32, patch_size=8, projection_dim=32)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, pad_token_id=tokenizer.pad_token_id,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       tie_word_embeddings=False)
    config = LlavaNextConfig(vision_config=vision, text_config=text,
                             image_token_id=tokenizer.convert_tokens_to_ids(tiny.IMAGE_TOKEN),
                             vision_feature_select_strategy="default", vision_feature_layer=-1,
                             image_grid_pinpoints=grid)
    config.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(0)
    model = LlavaNextForConditionalGeneration(config).eval()
    images = LlavaNextImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                     image_grid_pinpoints=grid)
    processor = LlavaNextProcessor(image_processor=images, tokenizer=tokenizer, patch_size=8,
                                   vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                   chat_template=tiny.CHAT_TEMPLATE)
    return tiny.save_pretrained(model, processor, directory)


@pytest.fixture(scope="module", params=["llava", "llava-next"])
def world(request, tmp_path_factory):
    """Pairs whose prompts differ in length (left padding in the batch) and
    whose chosen and rejected differ in length (right padding); for
    LLaVA-NeXT also images of different shapes (different crop counts)."""
    root = tmp_path_factory.mktemp("world")
    base, examples = preference_world(root)
    if request.param == "llava-next":
        base = tiny_llava_next(root / "next")
        for e, size in zip(examples, [(64, 32), (32, 64), (64, 64)], strict=False):
            Image.open(e.image_path).resize(size).save(e.image_path)
    prompts = ["Describe the image.", "What colour is the square in this picture?", "Describe it."]
    pairs = []
    for i, e in enumerate(examples[:3]):
        chosen = e.chosen_ids if i != 1 else e.chosen_ids[:2] + [e.chosen_ids[-1]]
        rejected = e.rejected_ids + e.rejected_ids[2:5] if i != 2 else e.rejected_ids[:1]
        pairs.append(PreferenceExample(e.image_path, prompts[i], list(chosen), list(rejected),
                                       chosen_ref_logp=-40.0 - i, rejected_ref_logp=-38.5 + i))
    return base, pairs


def _examples(pairs, tree: bool):
    return [dict(row) for row in preference_dataset(pairs, tree)]


def _step(base, pairs, forward: str, tree: bool, tmp_path):
    """One training step's loss, TRL's logged metrics and the trainable
    parameters' gradients, from the same starting weights."""
    config = CONFIG.replace(forward=forward, reference="auto" if tree else "recompute")
    processor = AutoProcessor.from_pretrained(base)
    model = AutoModelForImageTextToText.from_pretrained(base, dtype=torch.float32)
    lora, _ = lora_setup(model, config)
    trainer, tree_reference, shared = make_trainer(model, processor, pairs, config, lora, tmp_path / forward,
                                                   False, "cpu")
    assert (tree_reference, shared) == (tree, forward == "prefix-shared")
    # LoRA's B starts at zero, which zeroes A's gradient: start from random B.
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in sorted(trainer.model.named_parameters()):
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    batch = trainer.data_collator(_examples(pairs, tree))
    # What trainer.train() sets up before its first step. Checkpointing recomputes
    # the layers during backward, which must then attend as in the forward.
    trainer.current_gradient_accumulation_steps = 1
    trainer.model.activation_checkpointing_enable()
    assert trainer.model.is_activation_checkpointing
    loss = trainer.training_step(trainer.model, batch)
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    return float(loss), metrics, grads


def test_the_shared_batch_carries_the_concatenated_fields(world):
    base, pairs = world
    processor = AutoProcessor.from_pretrained(base)
    pad = processor.tokenizer.pad_token_id
    rows = _examples(pairs, tree=True)
    plain = TokenPreferenceCollator(processor, pad)(rows)
    shared = prefix_shared.PrefixSharedCollator(processor, pad)(rows)
    for key in ("input_ids", "attention_mask", "completion_mask", "ref_chosen_logps", "ref_rejected_logps"):
        assert torch.equal(plain[key], shared[key]), key
    # Each image once, not twice.
    for key in ("pixel_values", "image_sizes"):
        if key in plain:
            assert torch.equal(prefix_shared.concatenated_batch(shared)[key], plain[key]), key
    # Every response token is scored once, where the concatenated rows hold it.
    layout = shared[prefix_shared.LAYOUT_KEY]
    placed = torch.zeros_like(plain["completion_mask"])
    placed[layout["out_row"], layout["out_col"] + 1] = 1
    assert torch.equal(placed, plain["completion_mask"])
    assert torch.equal(plain["input_ids"][layout["out_row"], layout["out_col"] + 1], layout["labels"])


@pytest.mark.parametrize("tree", [True, False], ids=["tree-reference", "recomputed-reference"])
def test_prefix_shared_loss_and_gradients_equal_the_concatenated(world, tmp_path, tree):
    base, pairs = world
    loss_c, metrics_c, grads_c = _step(base, pairs, "concatenated", tree, tmp_path)
    loss_s, metrics_s, grads_s = _step(base, pairs, "prefix-shared", tree, tmp_path)
    assert loss_c > 0.01  # a loss with something to learn, not a saturated one
    assert loss_s == pytest.approx(loss_c, rel=1e-5, abs=1e-6)
    for key in ("logps/chosen", "logps/rejected", "rewards/margins", "entropy", "logits/chosen",
                "mean_token_accuracy", "num_tokens"):
        assert metrics_s[key] == pytest.approx(metrics_c[key], rel=1e-4, abs=1e-5), key
    assert grads_s.keys() == grads_c.keys()
    assert any("lora_A" in n for n in grads_c) and any("modules_to_save" in n for n in grads_c)
    for name, grad in grads_c.items():
        scale = grad.abs().max().item()
        assert scale > 0, name  # every trainable tensor gets a gradient to compare
        assert (grads_s[name] - grad).abs().max().item() <= 1e-4 * scale + 1e-7, name


def test_auto_is_prefix_shared_and_training_records_it(world, tmp_path):
    base, pairs = world
    result = train_dpo(str(base), pairs[:2], tmp_path / "model", tmp_path / "ckpt",
                       CONFIG.replace(epochs=1, save_steps=100), device="cpu")
    assert result.extra["forward"] == "prefix-shared"
    assert all(torch.isfinite(torch.tensor(m["loss"])) for m in result.metrics)


def test_prefix_shared_is_refused_where_the_architecture_is_not_supported(world):
    base, _ = world
    model = AutoModelForImageTextToText.from_pretrained(base, dtype=torch.float32)
    assert prefix_shared.resolve_forward("auto", model) is True
    model.config.model_type = "qwen2_vl"  # stands for any architecture not checked against the concatenated forward
    assert prefix_shared.resolve_forward("auto", model) is False
    assert prefix_shared.resolve_forward("concatenated", model) is False
    with pytest.raises(ValueError, match='prefix-shared" supports LLaVA-1.5, LLaVA-NeXT models, not qwen2_vl'):
        prefix_shared.resolve_forward("prefix-shared", model)
