"""Shared tiny-model fixtures (session scoped, saved to temp dirs).

- `tiny_llava_dir`: a random tiny LLaVA (word-level tokenizer, "." its own token).
- `trained_llava_dir`: the same architecture trained for a few seconds on
  templated captions, so that it writes sentences that end with "." and
  responses that end with EOS (a random model mostly says ".").
- `tiny_clip_dir`: a random tiny open_clip model in `local-dir:` layout.
- `policy`, `trained_policy`, `clip_scorer`: those loaded back through
  `csr.engine.loading`, the path a user's model takes.
- `colour_images`: a few solid-colour PIL images.
"""

from __future__ import annotations

import random

import pytest
import torch
from PIL import Image

from csr.engine.demo import tiny

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 200, 30),
    "blue": (30, 30, 220),
    "yellow": (230, 220, 30),
}
SHAPES = ["square", "circle", "triangle"]
PROMPT = "Describe the image."
WORDS = "there is a the background is big small on left right of image picture shows and with".split()
CORPUS = [" ".join(WORDS), *COLOURS, *SHAPES, PROMPT.lower()]


def _caption(rng: random.Random, colour: str) -> str:
    shape = rng.choice(SHAPES)
    size = rng.choice(["big", "small"])
    other = rng.choice([c for c in COLOURS if c != colour])
    sentences = [
        f"there is a {size} {colour} {shape} .",
        f"the background is {other} .",
        f"the {shape} is on the {rng.choice(['left', 'right'])} of the image .",
        f"the picture shows a {colour} {shape} and a {other} {rng.choice(SHAPES)} .",
    ]
    return " ".join(sentences[: rng.randint(1, len(sentences))])


def train_tiny_llava(model, processor, images: dict[str, Image.Image], steps: int = 80, seed: int = 0):
    """A few Adam steps of captioning, loss on the response and EOS only."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    prompt_len = processor(text=prompt, images=images["red"], return_tensors="pt")["input_ids"].shape[1]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    threads = torch.get_num_threads()
    # Tiny matrices: one thread is faster than two fighting over a shared CPU.
    torch.set_num_threads(1)
    try:
        _train_steps(model, processor, images, optimizer, prompt, prompt_len, steps, rng)
    finally:
        torch.set_num_threads(threads)
    model.eval()
    return model


def _train_steps(model, processor, images, optimizer, prompt, prompt_len, steps, rng) -> None:
    tokenizer = processor.tokenizer
    for _ in range(steps):
        colours = [rng.choice(list(images)) for _ in range(8)]
        texts = [f"{prompt} {_caption(rng, c)} {tokenizer.eos_token}" for c in colours]
        batch = processor(
            text=texts, images=[images[c] for c in colours], return_tensors="pt", padding=True
        )
        labels = batch["input_ids"].clone()
        labels[:, :prompt_len] = -100
        labels[batch["attention_mask"] == 0] = -100
        loss = model(**batch, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


@pytest.fixture(scope="session")
def colour_images() -> dict[str, Image.Image]:
    return {name: Image.new("RGB", (40, 36), rgb) for name, rgb in COLOURS.items()}


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return tiny.train_word_tokenizer(CORPUS)


@pytest.fixture(scope="session")
def tiny_llava_dir(tmp_path_factory, tiny_tokenizer):
    model, processor = tiny.build_tiny_llava(tiny_tokenizer, seed=0)
    return tiny.save_pretrained(model, processor, tmp_path_factory.mktemp("tiny-llava"))


@pytest.fixture(scope="session")
def trained_llava_dir(tmp_path_factory, tiny_tokenizer, colour_images):
    model, processor = tiny.build_tiny_llava(tiny_tokenizer, seed=1)
    processor.tokenizer.padding_side = "right"
    train_tiny_llava(model, processor, colour_images)
    return tiny.save_pretrained(model, processor, tmp_path_factory.mktemp("trained-llava"))


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory):
    model, config = tiny.build_tiny_clip(seed=0)
    return tiny.save_open_clip(model, config, tmp_path_factory.mktemp("tiny-clip"))


@pytest.fixture(scope="session")
def policy(tiny_llava_dir):
    from csr.engine.loading import load_policy

    return load_policy(str(tiny_llava_dir))


@pytest.fixture(scope="session")
def trained_policy(trained_llava_dir):
    from csr.engine.loading import load_policy

    return load_policy(str(trained_llava_dir))


@pytest.fixture(scope="session")
def clip_scorer(tiny_clip_dir):
    from csr.engine.loading import load_clip

    return load_clip(f"local-dir:{tiny_clip_dir}", None)
