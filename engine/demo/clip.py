"""The demo world's reward CLIP: trained on the world's scenes and sentences,
cached like the policy (engine/demo/models.py)."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path

import torch
from PIL import Image

from csr.engine.demo import tiny
from csr.engine.demo.models import (
    CLIP_RECIPES,
    ClipRecipe,
    cached_or_train,
    cosine,
    make_manifest,
    validation_scenes,
    world_of,
)
from csr.engine.demo.world import (
    Scene,
    WorldConfig,
    object_name,
    object_sentence,
)


def clip_sentences(config: WorldConfig) -> tuple[list[str], list[str]]:
    """(object names, their sentences) in the same order."""
    pairs = [
        (object_name(c, s), object_sentence(c, s)) for c in config.colours for s in config.shapes
    ]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _clip_image_tensor(images: Sequence[Image.Image], image_size: int) -> torch.Tensor:
    import open_clip

    # The transform open_clip builds from our saved preprocess_cfg at load time.
    transform = open_clip.image_transform(
        image_size,
        is_train=False,
        mean=open_clip.OPENAI_DATASET_MEAN,
        std=open_clip.OPENAI_DATASET_STD,
    )
    return torch.stack([transform(im) for im in images])


def train_demo_clip(
    scenes: Sequence[Scene],
    out_dir: Path,
    steps: int | None = None,
    seed: int = 0,
    size: str = "default",
) -> Path:
    """Train (or reuse) the reward CLIP; returns out_dir, loadable with
    open_clip.create_model_and_transforms("local-dir:" + out_dir)."""
    recipe = CLIP_RECIPES[size]
    if steps is not None:
        recipe = replace(recipe, steps=steps)
    config = world_of(scenes)
    manifest = make_manifest("clip", config, scenes, {"recipe": asdict(recipe), "seed": seed})

    def train(directory: Path) -> dict:
        model, clip_config, metrics = fit_clip(scenes, recipe, seed)
        tiny.save_open_clip(model, clip_config, directory)
        return metrics

    return cached_or_train(out_dir, manifest, train)


def fit_clip(scenes: Sequence[Scene], recipe: ClipRecipe, seed: int = 0):
    """Every image against every object sentence of the world, with a sigmoid
    (SigLIP-style) loss: an image holds several objects, so a softmax over
    in-batch pairs would push present objects apart as false negatives."""
    from open_clip.tokenizer import SimpleTokenizer

    config = world_of(scenes)
    started = time.perf_counter()
    clip_config = tiny.tiny_clip_config(recipe.embed_dim, config.image_size)
    model, clip_config = tiny.build_tiny_clip(seed, clip_config)
    names, sentences = clip_sentences(config)
    text_tokens = SimpleTokenizer()(sentences)
    pixels = _clip_image_tensor([s.render() for s in scenes], config.image_size)
    targets = _presence(scenes, names)
    # The bias only serves the loss (most pairs are negatives); cosine, which
    # R_I uses, does not depend on it, so it is not saved.
    bias = torch.nn.Parameter(torch.tensor(-5.0))
    params = [*model.parameters(), bias]
    optimiser = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    losses = []
    for step in range(recipe.steps):
        idx = torch.randint(len(scenes), (recipe.batch_size,), generator=generator)
        for group in optimiser.param_groups:
            group["lr"] = recipe.lr * cosine(step, recipe.steps, recipe.warmup_steps)
        image_features = model.encode_image(pixels[idx], normalize=True)
        text_features = model.encode_text(text_tokens, normalize=True)
        logits = model.logit_scale.exp() * image_features @ text_features.T + bias
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, targets[idx])
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        losses.append(loss.item())
    model.eval()
    tail = losses[-10:]
    held_back = validation_scenes(config, 100)
    with torch.no_grad():
        scores = (
            model.encode_image(
                _clip_image_tensor([s.render() for s in held_back], config.image_size),
                normalize=True,
            )
            @ model.encode_text(text_tokens, normalize=True).T
        )
    metrics = {
        "final_loss": sum(tail) / len(tail) if tail else None,
        "train_seconds": round(time.perf_counter() - started, 2),
        "train_scenes": len(scenes),
        "validation_auc": round(presence_auc(scores, _presence(held_back, names)), 4),
    }
    return model, clip_config, metrics


def _presence(scenes: Sequence[Scene], names: Sequence[str]) -> torch.Tensor:
    """(scenes x objects) 0/1 matrix: is the object in the scene."""
    return torch.tensor([[float(n in s.truth) for n in names] for s in scenes])


def presence_auc(scores: torch.Tensor, present: torch.Tensor) -> float:
    """Probability that a present (image, object) pair outscores an absent one."""
    positive, negative = scores[present.bool()], scores[~present.bool()]
    if not len(positive) or not len(negative):
        return float("nan")
    return (positive[:, None] > negative[None, :]).float().mean().item()
