"""The demo world: small seeded images of coloured shapes, their captions and
LLaVA-style prompts, so CSR can be run end to end and its effect on object
hallucination measured (CHAIR) without any downloaded model or data set.

An *object* is a (colour, shape) pair named like "red circle": counting shapes
alone would call "a blue square" correct on an image with a red square, so a
colour error is a hallucinated object here, as it is for a reader.

Every scene is a pure function of (config.seed, split, index), so a scene set
is reproducible bit for bit and `generate_scenes(c, 10)` is a prefix of
`generate_scenes(c, 100)`. Train and held-out scenes come from different seed
streams *and* from disjoint halves of the layout space (a hash of the objects
and their cells decides the split), so no held-out layout is ever trained on.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SPLITS = ("train", "heldout")

# Prompts in the style of LLaVA's detailed-description instructions; all ask
# for the same content, so the caption is the right answer to each.
PROMPTS = (
    "Describe the image.",
    "What objects are in this picture?",
    "What is in the image?",
    "List the objects you see.",
    "Describe this picture in detail.",
)

# Base RGB per colour name; each object gets a small random tint around it so
# that colour is a region of colour space, not one exact value.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (205, 45, 45),
    "green": (45, 165, 70),
    "blue": (50, 90, 225),
    "yellow": (230, 210, 50),
    "purple": (145, 65, 200),
    "orange": (240, 140, 35),
    "white": (235, 235, 235),
}
SHAPES = ("circle", "square", "triangle", "diamond", "cross")


@dataclass(frozen=True)
class WorldConfig:
    seed: int = 0
    image_size: int = 32
    grid: int = 2  # the canvas is grid x grid cells, at most one object per cell
    shapes: tuple[str, ...] = SHAPES
    colours: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "orange")
    min_objects: int = 1
    max_objects: int = 4
    min_size: float = 0.7  # object size as a share of the cell side
    max_size: float = 0.9
    jitter: float = 0.5  # share of the free space in a cell an object may move by
    tint: int = 18  # max per-channel deviation from the palette colour
    noise: float = 6.0  # std of the per-pixel background noise
    heldout_share: float = 0.15  # share of the layout space reserved for held-out scenes

    def __post_init__(self) -> None:
        unknown_shapes = set(self.shapes) - set(SHAPES)
        unknown_colours = set(self.colours) - set(PALETTE)
        if unknown_shapes or unknown_colours:
            raise ValueError(f"unknown shapes/colours: {sorted(unknown_shapes | unknown_colours)}")
        if not 1 <= self.min_objects <= self.max_objects <= self.grid * self.grid:
            raise ValueError("need 1 <= min_objects <= max_objects <= grid * grid")
        if self.max_objects > len(self.shapes) * len(self.colours):
            raise ValueError("max_objects exceeds the number of distinct objects")
        if not 0.0 < self.heldout_share < 1.0:
            raise ValueError("heldout_share must lie strictly between 0 and 1")

    @property
    def object_names(self) -> tuple[str, ...]:
        return tuple(object_name(c, s) for c in self.colours for s in self.shapes)

    def to_json(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self.__dict__.items()}


def object_name(colour: str, shape: str) -> str:
    return f"{colour} {shape}"


@dataclass(frozen=True)
class WorldObject:
    colour: str
    shape: str
    cell: int  # row-major index in the grid; captions list objects in this order
    centre: tuple[float, float]  # pixels
    size: float  # pixels, side of the bounding square
    rgb: tuple[int, int, int]

    @property
    def name(self) -> str:
        return object_name(self.colour, self.shape)


@dataclass(frozen=True)
class Scene:
    id: str
    split: str
    index: int
    objects: tuple[WorldObject, ...]
    prompt: str
    background: tuple[int, int, int]
    noise_seed: int
    config: WorldConfig = field(repr=False)

    @property
    def truth(self) -> frozenset[str]:
        return frozenset(o.name for o in self.objects)

    def render(self) -> Image.Image:
        return render(self)


def caption(scene: Scene) -> str:
    """One sentence per object, in reading order: the target the policy learns."""
    return " ".join(object_sentence(o.colour, o.shape) for o in scene.objects)


def object_sentence(colour: str, shape: str) -> str:
    article = "an" if colour[0] in "aeiou" else "a"
    return f"There is {article} {colour} {shape}."


def world_corpus(config: WorldConfig) -> list[str]:
    """Every sentence the world can produce; a tokenizer trained on it covers
    all captions and prompts of this config."""
    sentences = [object_sentence(c, s) for c in config.colours for s in config.shapes]
    return sentences + list(PROMPTS)


def _layout_split(config: WorldConfig, objects: Iterable[WorldObject]) -> str:
    key = ";".join(sorted(f"{o.cell}:{o.name}" for o in objects))
    digest = hashlib.sha256(f"{config.seed}|{key}".encode()).digest()
    fraction = int.from_bytes(digest[:8], "big") / 2**64
    return "heldout" if fraction < config.heldout_share else "train"


def _sample_objects(config: WorldConfig, rng: random.Random) -> tuple[WorldObject, ...]:
    n = rng.randint(config.min_objects, config.max_objects)
    cells = sorted(rng.sample(range(config.grid * config.grid), n))
    kinds = rng.sample([(c, s) for c in config.colours for s in config.shapes], n)
    side = config.image_size / config.grid
    objects = []
    for cell, (colour, shape) in zip(cells, kinds, strict=True):
        size = side * rng.uniform(config.min_size, config.max_size)
        slack = config.jitter * (side - size) / 2  # keeps the object inside its cell
        row, col = divmod(cell, config.grid)
        cx = (col + 0.5) * side + rng.uniform(-slack, slack)
        cy = (row + 0.5) * side + rng.uniform(-slack, slack)
        base = PALETTE[colour]
        rgb = tuple(min(255, max(0, v + rng.randint(-config.tint, config.tint))) for v in base)
        objects.append(WorldObject(colour, shape, cell, (cx, cy), size, rgb))  # type: ignore[arg-type]
    return tuple(objects)


def make_scene(config: WorldConfig, index: int, split: str = "train") -> Scene:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
    # A string seed is hashed with SHA-512 by random.Random: stable across
    # runs and platforms, and a distinct stream per (seed, split, index).
    rng = random.Random(f"csr-world|{config.seed}|{split}|{index}")
    while True:  # rejection keeps each split inside its half of the layout space
        objects = _sample_objects(config, rng)
        if _layout_split(config, objects) == split:
            break
    grey = rng.randint(25, 70)
    return Scene(
        id=f"{split}-{index:05d}",
        split=split,
        index=index,
        objects=objects,
        prompt=rng.choice(PROMPTS),
        background=(grey, grey, grey),
        noise_seed=rng.getrandbits(63),
        config=config,
    )


def generate_scenes(
    config: WorldConfig, n: int, split: str = "train", start: int = 0
) -> list[Scene]:
    """Scenes start .. start+n-1 of a split. Disjoint index ranges give
    disjoint scene sets, e.g. the policy's training images and CSR's prompts."""
    return [make_scene(config, i, split) for i in range(start, start + n)]


def render(scene: Scene) -> Image.Image:
    size = scene.config.image_size
    noise = np.random.default_rng(scene.noise_seed).normal(0.0, scene.config.noise, (size, size, 3))
    canvas = np.clip(np.array(scene.background, dtype=np.float64) + noise, 0, 255)
    image = Image.fromarray(canvas.round().astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        _draw_shape(draw, obj)
    return image


def _draw_shape(draw: ImageDraw.ImageDraw, obj: WorldObject) -> None:
    cx, cy = obj.centre
    h = obj.size / 2
    box = (cx - h, cy - h, cx + h, cy + h)
    if obj.shape == "circle":
        draw.ellipse(box, fill=obj.rgb)
    elif obj.shape == "square":
        # A touch smaller than the box: a full-box square looks much bigger than the rest.
        s = h * 0.85
        draw.rectangle((cx - s, cy - s, cx + s, cy + s), fill=obj.rgb)
    elif obj.shape == "triangle":
        draw.polygon([(cx, cy - h), (cx + h, cy + h), (cx - h, cy + h)], fill=obj.rgb)
    elif obj.shape == "diamond":
        draw.polygon([(cx, cy - h), (cx + h, cy), (cx, cy + h), (cx - h, cy)], fill=obj.rgb)
    elif obj.shape == "cross":
        t = h / 3
        draw.rectangle((cx - h, cy - t, cx + h, cy + t), fill=obj.rgb)
        draw.rectangle((cx - t, cy - h, cx + t, cy + h), fill=obj.rgb)
    else:  # guarded by WorldConfig; kept so a new shape cannot render as nothing
        raise ValueError(f"no renderer for shape {obj.shape!r}")


def write_prompt_set(scenes: Sequence[Scene], directory: Path) -> Path:
    """Write images/, prompts.jsonl (what `csr prompts import FILE --images DIR`
    reads) and truth.json (id -> object names, for CHAIR). Returns the JSONL path."""
    directory = Path(directory)
    images = directory / "images"
    images.mkdir(parents=True, exist_ok=True)
    lines = []
    truth: dict[str, list[str]] = {}
    for scene in scenes:
        file_name = f"{scene.id}.png"
        scene.render().save(images / file_name, format="PNG")
        lines.append(json.dumps({"id": scene.id, "image": file_name, "prompt": scene.prompt}))
        truth[scene.id] = sorted(scene.truth)
    prompts = directory / "prompts.jsonl"
    prompts.write_text("\n".join(lines) + "\n")
    (directory / "truth.json").write_text(json.dumps(truth, indent=1, sort_keys=True) + "\n")
    return prompts
