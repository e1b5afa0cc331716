"""Import benchmark: `csr prompts import` of 10,000 LLaVA-format prompts into a fresh SQLite store.

    python bench/bench_import.py                          # 10,000 prompts, one 64x64 PNG each
    python bench/bench_import.py --prompts-per-image 3    # LLaVA-like: several questions per image
    python bench/bench_import.py --prompts 2000           # a quicker run

The data: a JSON list in the LLaVA instruction format (`id`, `image`,
`conversations` with a human turn holding `<image>` and the question, and a
gpt answer), written to a temporary directory with its images: small PNGs of
random pixels (64x64 by default; random so that every image has its own
content hash and compresses like a photo). By default every prompt has its
own image, the harder case for the importer (10,000 files to read, verify and
hash); LLaVA-Instruct itself has about two questions per COCO image.

Timed:
1. the real CLI: `csr --db sqlite:///... prompts import FILE --images DIR`
   in a subprocess on a store made by `csr init` (wall clock, including the
   interpreter's start);
2. in process, on a second fresh store, the parts of one import: parse the
   file, find and inspect (read, verify, hash) the images, write the rows.

The target (issue 2) is under 30 s for 10,000 prompts on the project's
2-core machine. Exits non-zero when the CLI run misses --target.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

CSR = Path(sys.executable).parent / "csr"
QUESTIONS = [
    "What is the colour of the object in the image?",
    "Describe the image in detail.",
    "How many animals are visible?",
    "What might be the purpose of this scene?",
    "Is there anything unusual about this picture?",
]


def make_dataset(root: Path, n_prompts: int, per_image: int, size: int, seed: int) -> tuple[Path, Path, int]:
    images = root / "train2014"
    images.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    n_images = -(-n_prompts // per_image)
    for i in range(n_images):
        pixels = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
        Image.fromarray(pixels, "RGB").save(images / f"COCO_train2014_{i:012d}.png", compress_level=1)
    records = []
    for n in range(n_prompts):
        image = n // per_image
        question = QUESTIONS[n % len(QUESTIONS)]
        human = f"<image>\n{question}" if n % 2 else f"{question}\n<image>"
        records.append(
            {
                "id": f"{image:012d}-{n % per_image}",
                "image": f"{image:012d}.png",  # imported with --image-prefix COCO_train2014_
                "conversations": [
                    {"from": "human", "value": human},
                    {"from": "gpt", "value": "A plausible answer of one or two sentences."},
                ],
            }
        )
    prompts = root / "llava_bench.json"
    prompts.write_text(json.dumps(records))
    return prompts, images, n_images


def run(argv: list[str]) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "CSR_DATABASE_URL"}
    done = subprocess.run([str(CSR), *argv], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        sys.exit(f"csr {' '.join(argv)} failed:\n{done.stderr}")
    return done


def in_process_breakdown(prompts: Path, images: Path, url: str) -> dict[str, float]:
    from csr.engine.io import importing
    from csr.engine.io.prompt_files import parse_prompt_file
    from csr.storage.store import Store, create_store

    engine, _ = create_store(url)
    try:
        start = time.perf_counter()
        parsed = parse_prompt_file(prompts)
        parse_s = time.perf_counter() - start
        start = time.perf_counter()
        problems: list = []
        records, _infos = importing._with_images(parsed.records, images, "COCO_train2014_", problems)
        images_s = time.perf_counter() - start
        assert not problems and len(records) == len(parsed.records), problems[:3]
        start = time.perf_counter()
        report = importing.import_prompts(Store(engine), prompts, images, image_prefix="COCO_train2014_")
        whole_s = time.perf_counter() - start
    finally:
        engine.dispose()
    assert report.added == len(records)
    return {"parse": parse_s, "images": images_s, "whole import": whole_s,
            "write (whole - parse - images)": max(whole_s - parse_s - images_s, 0.0)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=10_000)
    parser.add_argument("--prompts-per-image", type=int, default=1)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--target", type=float, default=30.0, help="seconds the CLI import must stay under")
    parser.add_argument("--no-breakdown", action="store_true", help="only time the CLI")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="csr-bench-import-") as tmp:
        root = Path(tmp)
        start = time.perf_counter()
        prompts, images, n_images = make_dataset(root, args.prompts, args.prompts_per_image, args.image_size, args.seed)
        print(f"generated {args.prompts:,} prompts over {n_images:,} {args.image_size}x{args.image_size} PNGs "
              f"({sum(p.stat().st_size for p in images.iterdir()) / 1e6:.1f} MB) in {time.perf_counter() - start:.1f} s")

        url = f"sqlite:///{root / 'cli.db'}"
        run(["--db", url, "init"])
        start = time.perf_counter()
        done = run(["--db", url, "prompts", "import", str(prompts), "--images", str(images),
                    "--image-prefix", "COCO_train2014_"])
        cli_s = time.perf_counter() - start
        print(done.stdout.strip())
        again_start = time.perf_counter()
        again = run(["--db", url, "prompts", "import", str(prompts), "--images", str(images),
                     "--image-prefix", "COCO_train2014_"])
        again_s = time.perf_counter() - again_start
        if f"imported 0 prompt(s) (0 new image(s)); {args.prompts} already present" not in again.stdout:
            sys.exit(f"re-import added something: {again.stdout}")

        if not args.no_breakdown:
            parts = in_process_breakdown(prompts, images, f"sqlite:///{root / 'inproc.db'}")
            print("in process: " + ", ".join(f"{name} {seconds:.2f} s" for name, seconds in parts.items()))
        print(f"re-import of the same file (adds nothing): {again_s:.1f} s")
        print(f"csr prompts import, {args.prompts:,} prompts, SQLite, {os.cpu_count()} cores: "
              f"{cli_s:.1f} s ({args.prompts / cli_s:,.0f} prompts/s; target < {args.target:.0f} s)")
    return 0 if cli_s < args.target else 1


if __name__ == "__main__":
    sys.exit(main())
