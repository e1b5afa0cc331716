import json
from dataclasses import replace

import pytest
import torch

from csr.engine.demo import models as demo_models
from csr.engine.demo.clip import clip_sentences, presence_auc, train_demo_clip
from csr.engine.demo.models import (
    caption_batch,
    describe,
    read_manifest,
    train_demo_policy,
    user_prompt,
    world_of,
)
from csr.engine.demo.world import WorldConfig, caption, generate_scenes
from csr.engine.evaluate.chair import chair, world_vocabulary

CONFIG = WorldConfig(seed=11)


@pytest.fixture(scope="module")
def scenes():
    return generate_scenes(CONFIG, 300)


@pytest.fixture(scope="module")
def heldout():
    return generate_scenes(CONFIG, 40, "heldout")


# Training to the quick recipe's quality takes a minute on two cores: the tests
# that need that quality are marked slow (`make test`); the plumbing tests use
# a policy of a few steps.
SMALL_STEPS = 3


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory, scenes):
    return train_demo_policy(scenes, tmp_path_factory.mktemp("m") / "policy", size="quick")


@pytest.fixture(scope="module")
def small_policy_dir(tmp_path_factory, scenes):
    return train_demo_policy(scenes, tmp_path_factory.mktemp("m") / "small-policy", size="quick", steps=SMALL_STEPS)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory, scenes):
    return train_demo_clip(scenes, tmp_path_factory.mktemp("m") / "clip", size="quick")


def test_training_target_is_template_then_caption_then_eos(scenes):
    from csr.engine.demo.tiny import build_tiny_llava

    _, processor = build_tiny_llava(demo_models.policy_tokenizer(CONFIG))
    batch = caption_batch(processor, scenes[:4])
    tokenizer = processor.tokenizer
    for row, scene in enumerate(scenes[:4]):
        ids = batch["input_ids"][row][batch["attention_mask"][row] == 1]
        labels = batch["labels"][row]
        target = labels[labels != -100]
        # the unmasked tail is exactly the caption and EOS ...
        assert target[-1] == tokenizer.eos_token_id
        assert tokenizer.decode(target[:-1]) == caption(scene).lower()
        # ... and what precedes it is exactly the generation prompt the engine uses
        context = ids[: len(ids) - len(target)]
        expected = processor(
            text=[user_prompt(processor, scene.prompt)],
            images=[scene.render()],
            return_tensors="pt",
        )["input_ids"][0]
        assert torch.equal(context, expected)
        assert target.tolist() == ids[len(context) :].tolist()


@pytest.mark.slow
def test_policy_loads_through_auto_classes_and_describes(policy_dir, heldout):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(policy_dir)
    processor = AutoProcessor.from_pretrained(policy_dir)
    assert model.config.model_type == "llava"
    assert "ASSISTANT:" in user_prompt(processor, "Describe the image.")

    responses = greedy_describe(
        policy_dir, [s.render() for s in heldout], [s.prompt for s in heldout]
    )
    assert len(responses) == len(heldout)
    result = chair(responses, [s.truth for s in heldout], world_vocabulary(CONFIG.object_names))
    # Even the quick policy learned the caption format from the shared template:
    # nearly every response names world objects in "there is a ..." sentences.
    assert sum(bool(r.mentioned) for r in result.per_response) >= 0.8 * len(heldout)
    assert sum(r.startswith("there is") for r in responses) >= 0.8 * len(heldout)


def test_policy_cache_is_reused_and_invalidated(small_policy_dir, scenes, monkeypatch):
    policy_dir = small_policy_dir
    manifest = read_manifest(policy_dir)
    assert manifest["kind"] == "policy" and manifest["metrics"]["train_seconds"] > 0
    weights = policy_dir / "model.safetensors"
    stamp = weights.stat().st_mtime_ns

    def must_not_train(*args, **kwargs):
        raise AssertionError("retrained although the cache matches")

    monkeypatch.setattr(demo_models, "fit_policy", must_not_train)
    assert train_demo_policy(scenes, policy_dir, size="quick", steps=SMALL_STEPS) == policy_dir
    assert weights.stat().st_mtime_ns == stamp

    # a different recipe or different scenes must not reuse it
    with pytest.raises(AssertionError, match="retrained"):
        train_demo_policy(scenes, policy_dir, size="quick", steps=SMALL_STEPS + 2)
    with pytest.raises(AssertionError, match="retrained"):
        train_demo_policy(scenes[:-1], policy_dir, size="quick", steps=SMALL_STEPS)
    # a failed training leaves the cached model as it was
    assert read_manifest(policy_dir) == manifest
    assert weights.stat().st_mtime_ns == stamp


def test_cache_replaces_stale_model_and_refuses_foreign_directory(tmp_path, scenes):
    small = scenes[:40]
    out = train_demo_clip(small, tmp_path / "clip", steps=2, size="quick")
    first = read_manifest(out)["hash"]
    train_demo_clip(small, out, steps=3, size="quick")
    assert read_manifest(out)["hash"] != first
    assert read_manifest(out)["settings"]["recipe"]["steps"] == 3
    assert [p.name for p in tmp_path.iterdir()] == ["clip"]  # no staging left behind

    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        train_demo_clip(small, foreign, steps=2, size="quick")
    assert (foreign / "notes.txt").read_text() == "keep me"


@pytest.mark.slow
def test_clip_loads_through_open_clip_and_prefers_present_objects(clip_dir, heldout):
    import open_clip

    config = json.loads((clip_dir / "open_clip_config.json").read_text())
    assert config["model_cfg"]["vision_cfg"]["image_size"] == CONFIG.image_size
    open_clip.create_model_and_transforms(f"local-dir:{clip_dir}")

    names, scores = clip_object_scores(clip_dir, heldout)
    present = torch.tensor([[name in s.truth for name in names] for s in heldout])
    assert scores[present].mean() > scores[~present].mean() + 1.0
    # per image, the average present object outranks the average absent one
    per_image = [
        scores[i][present[i]].mean() > scores[i][~present[i]].mean() for i in range(len(heldout))
    ]
    assert sum(per_image) >= 0.8 * len(heldout)
    # the quality measured at training time is recorded with the model
    recorded = read_manifest(clip_dir)["metrics"]["validation_auc"]
    assert recorded > 0.75
    assert presence_auc(scores, present) > 0.75


def test_early_stopping_stops_at_the_first_check_that_meets_the_target(scenes):
    quick = demo_models.POLICY_RECIPES["quick"]
    # What is checked is when training stops, not what it learns: few scenes,
    # few steps of small batches, two validation scenes.
    met = replace(quick, target_chair_s=1.0, min_recall=0.0, check_every=2, validation_scenes=2, batch_size=4)
    scenes = scenes[:40]
    _, _, metrics = demo_models.fit_policy(scenes, met, seed=0)
    assert metrics["steps"] == 2 and metrics["reached_target"]
    assert [h["step"] for h in metrics["history"]] == [2]

    # recall can never exceed 1: the target is unreachable, so all steps run
    unmet = replace(met, min_recall=1.01, steps=6)
    _, _, metrics = demo_models.fit_policy(scenes, unmet, seed=0)
    assert metrics["steps"] == 6 and not metrics["reached_target"]
    assert [h["step"] for h in metrics["history"]] == [2, 4, 6]


def test_validation_scenes_are_not_training_scenes(scenes):
    overlapping = demo_models.validation_scenes(CONFIG, 3)
    recipe = replace(demo_models.POLICY_RECIPES["quick"], target_chair_s=0.5, validation_scenes=3)
    with pytest.raises(ValueError, match="overlap"):
        demo_models.fit_policy(overlapping, recipe)
    assert all(s.split == "train" and s.index >= demo_models.VALIDATION_START for s in overlapping)


def greedy_describe(model_dir, images, prompts: list[str]) -> list[str]:
    """Load a saved policy the standard way (as a user of the demo's models
    would) and describe each image greedily."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(model_dir).eval()
    processor = AutoProcessor.from_pretrained(model_dir)
    return describe(model, processor, list(images), prompts, 64, 48)


@torch.no_grad()
def clip_object_scores(clip_dir, scenes) -> tuple[list[str], torch.Tensor]:
    """Load a saved CLIP the standard way; returns (object names, the
    (scenes x objects) matrix of 100 * cosine between image and object sentence)."""
    import open_clip

    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{clip_dir}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{clip_dir}")
    model.eval()
    names, sentences = clip_sentences(world_of(scenes))
    images = torch.stack([preprocess(s.render()) for s in scenes])
    image_features = model.encode_image(images, normalize=True)
    text_features = model.encode_text(tokenizer(sentences), normalize=True)
    return names, 100 * image_features @ text_features.T
