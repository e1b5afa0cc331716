"""A throwaway study for bench/device_check.sh: tiny models, a few images,
then `csr init`, `prompts import`, `generate`, `curate`, `train` through the
real command line, on the given device and dtype. Prints each step's time.

    python bench/train_step_study.py DIR --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from PIL import Image

from csr.engine.demo import tiny

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 220, 30)}
WORDS = "there is a the background is big small on left right of image picture shows and with".split()
PROMPT = "Describe the image."
SEARCH = {"num_token_beams": 2, "num_beam_groups": 2, "max_new_tokens": 10, "max_length": 40, "num_beams": 2}
TRAIN = {"lora_r": 4, "lora_alpha": 8, "epochs": 1, "batch_size": 2, "gradient_checkpointing": False}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("directory", type=Path)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--prompts", type=int, default=4)
    args = parser.parse_args(argv)
    root = args.directory
    root.mkdir(parents=True, exist_ok=True)
    tokenizer = tiny.train_word_tokenizer([" ".join(WORDS), *COLOURS, PROMPT.lower()])
    model, processor = tiny.build_tiny_llava(tokenizer, seed=0)
    llava = tiny.save_pretrained(model, processor, root / "policy")
    clip, config = tiny.build_tiny_clip(seed=0)
    clip_dir = tiny.save_open_clip(clip, config, root / "clip")
    (root / "images").mkdir(exist_ok=True)
    names = list(COLOURS)
    with (root / "prompts.jsonl").open("w") as handle:
        for i in range(args.prompts):
            colour = tuple(min(255, c + i) for c in COLOURS[names[i % len(names)]])
            Image.new("RGB", (40, 36), colour).save(root / "images" / f"{i}.png")
            handle.write(json.dumps({"id": f"p{i}", "image": f"{i}.png", "prompt": PROMPT}) + "\n")
    toml = ["[generate]"] + [f"{k} = {json.dumps(v)}" for k, v in SEARCH.items()]
    toml += ["", "[train]"] + [f"{k} = {json.dumps(v)}" for k, v in TRAIN.items()]
    (root / "csr.toml").write_text("\n".join(toml) + "\n")
    csr = shutil.which("csr") or str(Path(sys.executable).with_name("csr"))
    db = f"sqlite:///{root / 'store.db'}"
    steps = [
        ["init", "--model", str(llava), "--clip", f"local-dir:{clip_dir}"],
        ["prompts", "import", "prompts.jsonl", "--images", "images"],
        ["generate", "--iter", "1", "--quiet", "--device", args.device, "--dtype", args.dtype],
        ["curate", "--iter", "1", "--min-margin", "0"],
        ["train", "--iter", "1", "--device", args.device],
    ]
    for step in steps:
        t0 = time.perf_counter()
        done = subprocess.run([csr, "--db", db, *step], cwd=root, capture_output=True, text=True)
        print(f"csr {' '.join(step[:3])}: exit {done.returncode} in {time.perf_counter() - t0:.1f} s")
        if done.returncode != 0:
            print(done.stdout[-2000:], done.stderr[-4000:], sep="\n")
            return done.returncode
        if step[0] == "generate":  # the dtype the trees were searched in is part of the iteration
            with sqlite3.connect(root / "store.db") as conn:
                (config,) = conn.execute("SELECT config FROM iterations WHERE number = 1").fetchone()
            print(f"iteration 1 recorded dtype: {json.loads(config).get('dtype')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
