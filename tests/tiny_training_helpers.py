"""A tiny LLaVA model and a handful of preference pairs for training tests."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from csr.engine.demo import tiny
from csr.engine.train.dpo import PreferenceExample, TrainConfig, completion_ids

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 220, 30)}
PROMPT = "Describe the image."

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


def make_world(root: Path) -> tuple[Path, list[PreferenceExample]]:
    """A saved tiny LLaVA and one pair per colour image: the caption naming the
    image's colour is chosen, one naming another colour is rejected."""
    root.mkdir(parents=True, exist_ok=True)
    corpus = [f"there is a {c} square ." for c in COLOURS] + [PROMPT.lower()]
    tokenizer = tiny.train_word_tokenizer(corpus)
    model, processor = tiny.build_tiny_llava(tokenizer)
    model_dir = tiny.save_pretrained(model, processor, root / "base")
    names = list(COLOURS)
    examples = []
    for i, name in enumerate(names):
        path = root / f"{name}.png"
        Image.new("RGB", (32, 32), COLOURS[name]).save(path)
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
