"""docs/real-run.md runs as written: its `sh` blocks, in order, with the tiny
models standing in for 7B, the CPU for CUDA and two processes for eight."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from tests.study import SEARCH, TRAIN
from tests.worlds import COLOURS

GUIDE = Path(__file__).parents[1] / "docs" / "real-run.md"
CATEGORIES = ["dog", "cat", "car", "bus", "person", "chair", "cup", "bowl"]


def guide_script() -> str:
    blocks = re.findall(r"```sh\n(.*?)```", GUIDE.read_text(), flags=re.DOTALL)
    lines = [line for block in blocks for line in block.splitlines()]
    # the test's environment stands in for the guide's exports
    return "\n".join(["set -euo pipefail", *(line for line in lines if not line.startswith("export "))])


def _coco(root: Path) -> None:
    train, val, notes = root / "train2014", root / "val2014", root / "annotations"
    for folder in (train, val, notes):
        folder.mkdir(parents=True)
    colours = list(COLOURS.values())
    prompts = []
    for i in range(4):
        name = f"{i + 1:012d}.jpg"
        Image.new("RGB", (40, 36), colours[i % len(colours)]).save(train / f"COCO_train2014_{name}")
        prompts.append({"id": f"{i + 1}", "image": name, "input": "<image>\nDescribe the image in detail."})
    (root / "CSR-Prompt-Dataset-12k.json").write_text(json.dumps(prompts))
    objects = [["dog", "cat", "car"], ["bus", "person", "chair"], ["cup", "bowl", "dog", "person"]]
    annotations, captions = [], []
    for image_id, names in enumerate(objects, start=1):
        Image.new("RGB", (40, 36), colours[image_id % len(colours)]).save(val / f"COCO_val2014_{image_id:012d}.jpg")
        annotations += [{"id": len(annotations) + 1, "image_id": image_id, "category_id": CATEGORIES.index(n) + 1}
                        for n in names]
        captions.append({"id": image_id, "image_id": image_id, "caption": f"A {names[0]} next to a {names[1]}."})
    images = [{"id": i, "file_name": f"COCO_val2014_{i:012d}.jpg"} for i in range(1, len(objects) + 1)]
    categories = [{"id": i + 1, "name": n} for i, n in enumerate(CATEGORIES)]
    (notes / "instances_val2014.json").write_text(json.dumps(
        {"images": images, "annotations": annotations, "categories": categories}))
    (notes / "captions_val2014.json").write_text(json.dumps({"images": images, "annotations": captions}))


@pytest.mark.slow
def test_the_real_run_guide_runs_as_written(tmp_path, trained_llava_dir, tiny_clip_dir):
    coco = tmp_path / "coco"
    _coco(coco)
    study = tmp_path / "run" / "study"
    study.mkdir(parents=True)
    # small searches and training for two cores, in the study's settings file
    toml = ["[generate]"] + [f"{k} = {json.dumps(v)}" for k, v in SEARCH.items()]
    toml += ["", "[train]"] + [f"{k} = {json.dumps(v)}" for k, v in TRAIN.items()]
    (study / "csr.toml").write_text("\n".join(toml) + "\n")
    bin_dir = str(Path(sys.executable).parent)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        "MODEL": str(trained_llava_dir), "CLIP": f"local-dir:{tiny_clip_dir}", "CLIP_PRETRAINED": "",
        "COCO": str(coco), "PROMPTS": str(coco / "CSR-Prompt-Dataset-12k.json"),
        "GPUS": "2", "DEVICES": "cpu,cpu",
        "ACCELERATE_ARGS": "--cpu", "TRAIN_ARGS": "--device cpu",
        "EVAL_ARGS": "--max-new-tokens 8 --limit 3 --device cpu",
        "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
    }
    env.pop("CSR_DATABASE_URL", None)
    done = subprocess.run(["bash", "-c", guide_script()], cwd=tmp_path / "run", env=env,
                          capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    status = subprocess.run([f"{bin_dir}/csr", "status", "--json"], cwd=study, env=env, capture_output=True,
                            text=True, check=True)
    summary = json.loads(status.stdout)
    assert [v["version"] for v in summary["model_versions"]] == [0, 1, 2, 3]
    assert all(it["done"] == 4 for it in summary["iterations"])
