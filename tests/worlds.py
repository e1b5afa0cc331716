"""The tests' toy world, defined once: solid-colour images (red, green, blue,
yellow), captions about coloured shapes in a few dozen words, and the tiny
models that live in it.

- `colour_image` / `colour_images`: the images (PIL), `shift` makes distinct
  images of one colour (a pixel value apart: distinct files, distinct hashes).
- `word_tokenizer`: the word-level tokenizer over CORPUS that every tiny LLaVA
  of the tests uses; `train_tiny_llava`: a few seconds of captioning, so that
  a random model writes sentences that end with "." and responses that end
  with EOS (tests/conftest.py builds the session's models with these).
- `preference_world`: a saved tiny LLaVA and one DPO pair per colour (the
  caption naming the image's colour is chosen, another colour rejected), with
  `FAST_CONFIG`, training settings that move it visibly in a few steps.
- `write_prompts`: the world as a prompt file and image folder on disk, what
  `csr prompts import` reads (tests/study.py).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from PIL import Image

from csr.engine.demo import tiny
from csr.engine.train.config import TrainConfig
from csr.engine.train.dpo_data import PreferenceExample, completion_ids

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
IMAGE_SIZE = (40, 36)


def colour_image(colour: str, shift: int = 0) -> Image.Image:
    """A solid image of one of COLOURS, each channel `shift` brighter (capped at 255)."""
    return Image.new("RGB", IMAGE_SIZE, tuple(min(255, c + shift) for c in COLOURS[colour]))


def colour_images() -> dict[str, Image.Image]:
    return {name: colour_image(name) for name in COLOURS}


def caption(rng: random.Random, colour: str) -> str:
    """One to four sentences about a `colour` shape, as the trained model learns to write."""
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


# ------------------------------------------------------------------ tiny models


def word_tokenizer():
    return tiny.train_word_tokenizer(CORPUS)


def train_tiny_llava(model, processor, images: dict[str, Image.Image], steps: int = 80, seed: int = 0):
    """A few Adam steps of captioning, loss on the response and EOS only."""
    import torch

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
        texts = [f"{prompt} {caption(rng, c)} {tokenizer.eos_token}" for c in colours]
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


# ------------------------------------------------------------------ DPO pairs


# Settings that make a few steps on the tiny model move it visibly; the rest
# (LoRA shape, schedule, beta) stay at the paper's values.
FAST_CONFIG = TrainConfig(
    learning_rate=1e-3,
    projector_learning_rate=1e-3,
    lora_r=8,
    lora_alpha=16,
    epochs=3,
    save_steps=2,
    gradient_checkpointing=False,
)


def preference_world(root: Path) -> tuple[Path, list[PreferenceExample]]:
    """A saved random tiny LLaVA (the world's tokenizer, seed 0) and one pair per
    colour image: "There is a <its colour> square." chosen, the next colour's
    rejected. Returns (model directory, [PreferenceExample])."""
    root.mkdir(parents=True, exist_ok=True)
    tokenizer = word_tokenizer()
    model, processor = tiny.build_tiny_llava(tokenizer)
    model_dir = tiny.save_pretrained(model, processor, root / "base")
    names = list(COLOURS)
    examples = []
    for i, name in enumerate(names):
        path = root / f"{name}.png"
        colour_image(name).save(path)
        wrong = names[(i + 1) % len(names)]
        examples.append(
            PreferenceExample(
                image_path=str(path),
                prompt=PROMPT,
                chosen_ids=completion_ids(tokenizer, f"There is a {name} square."),
                rejected_ids=completion_ids(tokenizer, f"There is a {wrong} square."),
            )
        )
    return model_dir, examples


# ------------------------------------------------------------------ on disk


def write_prompts(directory: Path, prompts: int) -> None:
    """images/<i>.png (the colours in turn, each image a shade apart) and
    prompts.jsonl (ids p0, p1, ...; the world's prompt) in `directory`."""
    images = directory / "images"
    images.mkdir(parents=True)
    names = list(COLOURS)
    with (directory / "prompts.jsonl").open("w") as handle:
        for i in range(prompts):
            colour_image(names[i % len(names)], shift=i).save(images / f"{i}.png")
            handle.write(json.dumps({"id": f"p{i}", "image": f"{i}.png", "prompt": PROMPT}) + "\n")
