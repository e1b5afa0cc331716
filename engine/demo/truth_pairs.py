"""Preference data from elsewhere, for the demo world: pairs made from the
scenes' ground truth, the stand-in for human preference data (RLHF-V, POVID)
in the comparison of methods (docs/demo-results.md).

The chosen response is the scene's true caption; the rejected one is the
same caption with one object's sentence replaced by an object the scene does
not hold: a hallucination of the kind CHAIR counts, at the same length, as
correction data pairs a faithful description with a hallucinated one. The
file is written in TRL's layout and goes through `csr pairs import`'s own
reader, so the demo trains on it exactly as a user's imported set.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path

from csr.engine.demo.world import Scene, caption, object_sentence


def hallucinated_caption(scene: Scene, rng: random.Random) -> str:
    """The scene's caption with one object swapped for one it does not hold."""
    config = scene.config
    present = scene.truth
    absent = [(c, s) for c in config.colours for s in config.shapes if f"{c} {s}" not in present]
    replaced = rng.randrange(len(scene.objects))
    colour, shape = rng.choice(absent)
    return " ".join(
        object_sentence(colour, shape) if i == replaced else object_sentence(o.colour, o.shape)
        for i, o in enumerate(scene.objects)
    )


def write_truth_pairs(scenes: Sequence[Scene], path: Path, seed: int) -> Path:
    """One pair per scene in TRL's layout (prompt, chosen, rejected, image); the
    images are the prompt set's (`world.write_prompt_set`), named `<id>.png`."""
    rng = random.Random(seed)
    lines = [
        json.dumps({"id": scene.id, "prompt": scene.prompt, "chosen": caption(scene),
                    "rejected": hallucinated_caption(scene, rng), "image": f"{scene.id}.png"})
        for scene in scenes
    ]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path
