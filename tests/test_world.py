import json
import re

import numpy as np
import pytest

from csr.engine.demo.world import (
    PROMPTS,
    WorldConfig,
    caption,
    generate_scenes,
    make_scene,
    world_corpus,
    write_prompt_set,
)


def _layout(scene):
    return frozenset((o.cell, o.name) for o in scene.objects)


def test_same_seed_gives_identical_scenes_images_and_captions():
    config = WorldConfig(seed=3)
    a = generate_scenes(config, 20)
    b = generate_scenes(WorldConfig(seed=3), 20)
    assert [caption(s) for s in a] == [caption(s) for s in b]
    assert [s.prompt for s in a] == [s.prompt for s in b]
    assert all(x.render().tobytes() == y.render().tobytes() for x, y in zip(a, b, strict=True))


def test_different_seed_gives_different_scenes():
    a = generate_scenes(WorldConfig(seed=0), 20)
    b = generate_scenes(WorldConfig(seed=1), 20)
    assert [caption(s) for s in a] != [caption(s) for s in b]


def test_scene_depends_on_index_only():
    config = WorldConfig()
    assert generate_scenes(config, 5) == generate_scenes(config, 12)[:5]
    assert make_scene(config, 7, "heldout") == generate_scenes(config, 8, "heldout")[7]
    assert generate_scenes(config, 4, start=3) == generate_scenes(config, 7)[3:]


def test_splits_are_disjoint_in_ids_and_layouts():
    config = WorldConfig()
    train = generate_scenes(config, 600)
    heldout = generate_scenes(config, 150, "heldout")
    assert not {s.id for s in train} & {s.id for s in heldout}
    assert not {_layout(s) for s in train} & {_layout(s) for s in heldout}
    assert all(s.split == "heldout" for s in heldout)


def test_scene_contents_respect_the_config():
    config = WorldConfig(min_objects=2, max_objects=3, grid=3)
    for scene in generate_scenes(config, 200):
        assert 2 <= len(scene.objects) <= 3
        cells = [o.cell for o in scene.objects]
        assert cells == sorted(set(cells))  # one object per cell, reading order
        assert len(scene.truth) == len(scene.objects)  # objects are distinct
        assert scene.truth <= set(config.object_names)
        assert scene.prompt in PROMPTS
        assert scene.render().size == (config.image_size, config.image_size)


def test_object_colour_is_drawn_where_the_object_is():
    config = WorldConfig(noise=0.0, tint=0)
    scene = generate_scenes(config, 1)[0]
    pixels = np.asarray(scene.render())
    for obj in scene.objects:
        x, y = (round(v) for v in obj.centre)
        assert tuple(pixels[y, x]) == obj.rgb


def test_caption_is_one_sentence_per_object_in_reading_order():
    scene = generate_scenes(WorldConfig(), 50)[0]
    sentences = re.findall(r"[^.]+\.", caption(scene))
    assert len(sentences) == len(scene.objects)
    for sentence, obj in zip(sentences, scene.objects, strict=True):
        assert sentence.strip().startswith("There is a")
        assert sentence.strip().endswith(f"{obj.colour} {obj.shape}.")
    orange = WorldConfig(colours=("orange",), min_objects=1, max_objects=1)
    assert caption(generate_scenes(orange, 1)[0]).startswith("There is an orange ")


def test_corpus_covers_every_caption_and_prompt_word():
    config = WorldConfig()
    vocabulary = {w for line in world_corpus(config) for w in re.findall(r"\w+", line.lower())}
    for scene in generate_scenes(config, 100):
        words = re.findall(r"\w+", f"{caption(scene)} {scene.prompt}".lower())
        assert set(words) <= vocabulary


def test_write_prompt_set_layout_and_determinism(tmp_path):
    scenes = generate_scenes(WorldConfig(), 6)
    path = write_prompt_set(scenes, tmp_path / "a")
    write_prompt_set(generate_scenes(WorldConfig(), 6), tmp_path / "b")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["id"] for r in rows] == [s.id for s in scenes]
    assert [r["prompt"] for r in rows] == [s.prompt for s in scenes]
    for row in rows:
        image_a = (tmp_path / "a" / "images" / row["image"]).read_bytes()
        image_b = (tmp_path / "b" / "images" / row["image"]).read_bytes()
        assert image_a == image_b and image_a.startswith(b"\x89PNG")
    assert load_truth(tmp_path / "a") == {s.id: set(s.truth) for s in scenes}


@pytest.mark.parametrize(
    "kwargs",
    [
        {"shapes": ("hexagon",)},
        {"colours": ("mauve",)},
        {"min_objects": 0},
        {"max_objects": 10, "grid": 3},
        {"heldout_share": 1.0},
    ],
)
def test_bad_configs_are_refused(kwargs):
    with pytest.raises(ValueError):
        WorldConfig(**kwargs)


def load_truth(directory) -> dict[str, set[str]]:
    """The truth.json that write_prompt_set wrote, as sets."""
    data = json.loads((directory / "truth.json").read_text())
    return {key: set(names) for key, names in data.items()}
