"""Evaluation decode benchmark: the engine's greedy decoder against
transformers' `generate`, on CHAIR's settings, back to back in one run.

    python bench/bench_eval_decode.py                         # 256x4 model, 32 images, 512 new tokens, batch 16
    python bench/bench_eval_decode.py --images 16 --max-new-tokens 128 --ends model
    python bench/bench_eval_decode.py --benchmark pope --images 64
    python bench/bench_eval_decode.py --size 1b --device cuda

One random LLaVA-architecture model (bench_search's shapes; 256x4 = text
hidden 256 x 4 layers, 577 image tokens as LLaVA-1.5's 576 + CLS), saved to
disk and loaded by each side as `csr eval chair` loads a model version; the
same images and CHAIR's prompt ("Please describe this image in detail.")
for both; greedy; `--batch-size` as `csr eval --batch-size` (16).

(generate) `policy_generator(decoder="generate")`: transformers' `generate`,
    `batch_size` images at a time, each batch until its longest row ends;
(engine) `policy_generator(decoder="engine")`: engine/evaluate/decode.py,
    one preallocated KV cache, rows at their own lengths, a finished row
    replaced by the next image at once.

How responses end (`--ends`): "model" keeps the model's own EOS (a random
model rarely says it, so every row runs to max_new_tokens: the per-token
cost alone); "chair" (default) first decodes the images untimed without a
stop and makes EOS the tokens that end them nearest `--mean-length` new
tokens on average (default 130, a LLaVA-1.5 CHAIR description of about 100
words), written into the model's generation config for both sides (a list
of EOS ids, as `generate` takes it), so that responses end at different
lengths as descriptions do. The lengths are printed: they are a random
model's, which loops, not LLaVA's.

Printed for each: wall and CPU seconds, seconds per image, useful new
tokens per second (tokens up to each response's end, the same count for
both), forward passes; then the ratio and whether the outputs (the texts
`csr eval` stores) are identical. Threads: one by default (see
bench_search.py on the shared 2-core machine).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_search import PROMPTS, SIZES, WORDS, make_images  # noqa: E402

from csr.engine.demo import tiny  # noqa: E402
from csr.engine.evaluate import decode  # noqa: E402
from csr.engine.evaluate.benchmarks import (  # noqa: E402
    BATCH_SIZE,
    CHAIR_MAX_NEW_TOKENS,
    CHAIR_PROMPT,
    POPE_MAX_NEW_TOKENS,
    POPE_SUFFIX,
    policy_generator,
)
from csr.engine.loading import load_policy  # noqa: E402

# New tokens of a LLaVA-1.5 CHAIR description: about 100 words (the "Len" column
# of the CHAIR tables in the LLaVA-1.5 hallucination papers), about 1.3 Llama tokens a word.
MEAN_LENGTH = 130


def build_model(root: Path, size: str) -> Path:
    tokenizer = tiny.train_word_tokenizer([" ".join(WORDS), *PROMPTS, CHAIR_PROMPT])
    model, processor = tiny.build_tiny_llava(tokenizer, SIZES[size], seed=0)
    model.config.text_config.max_position_embeddings = 4096
    return tiny.save_pretrained(model, processor, root / "policy")


def eos_for_mean_length(path: Path, images, prompts, max_new_tokens: int, batch_size: int, device: str,
                        mean: float) -> list[int]:
    """Decodes without a stop (untimed) and returns the EOS ids that end the
    responses nearest `mean` new tokens on average: tokens added one at a
    time, each the one that brings the mean nearest (a random model loops
    over a few tokens, so one id rarely gets near)."""
    policy = load_policy(str(path), device=device)
    policy.model.generation_config.eos_token_id = None
    rows = decode.greedy_decode(policy, images, prompts, max_new_tokens, batch_size)

    def mean_length(stops: set[int]) -> float:
        return statistics.mean(next((i + 1 for i, t in enumerate(row) if t in stops), len(row)) for row in rows)

    chosen: set[int] = set()
    tokens = sorted({t for row in rows for t in row})
    while len(chosen) < 16:
        best = min(tokens, key=lambda t: (abs(mean_length(chosen | {t}) - mean), t))
        if abs(mean_length(chosen | {best}) - mean) >= abs(mean_length(chosen) - mean):
            break
        chosen.add(best)
    return sorted(chosen)


def generate_rows(lengths: list[int], batch_size: int) -> int:
    """Rows `generate` decodes: every row of a batch for each token after the
    first (the prefill gives it) until the batch's longest response ends."""
    return sum(len(lengths[i : i + batch_size]) * (max(lengths[i : i + batch_size]) - 1)
               for i in range(0, len(lengths), batch_size))


def pope_questions(count: int) -> list[str]:
    """POPE's question template over objects of one to three words, with
    LLaVA-1.5's suffix: prompts of different token lengths."""
    objects = ["dog", "red car", "person near the tree", "bus", "small round table", "cat", "white bird", "chair"]
    return [f"Is there a {objects[i % len(objects)]} in the image?{POPE_SUFFIX}" for i in range(count)]


def set_eos(path: Path, eos: list[int]) -> None:
    config_path = path / "generation_config.json"
    config = json.loads(config_path.read_text())
    config["eos_token_id"] = eos
    config_path.write_text(json.dumps(config, indent=2))


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_generate(path: Path, images, prompts, max_new_tokens: int, batch_size: int, device: str) -> dict:
    """`csr eval`'s generate path, as it runs."""
    generate = policy_generator(str(path), device=device, batch_size=batch_size, decoder="generate")
    load = os.getloadavg()[0]
    _sync(device)
    cpu, wall = time.process_time(), time.perf_counter()
    texts = generate(images, prompts, max_new_tokens)
    _sync(device)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {"label": "generate", "texts": texts, "wall": wall, "cpu": cpu, "load": (load, os.getloadavg()[0])}


def run_engine(path: Path, images, prompts, max_new_tokens: int, batch_size: int, device: str) -> dict:
    """`csr eval`'s engine path (policy_generator's: greedy_decode, then the
    texts), with the token ids kept for the counts."""
    policy = load_policy(str(path), device=device)
    assert decode.unsupported(policy.model) is None
    stats = decode.DecodeStats()
    load = os.getloadavg()[0]
    _sync(device)
    cpu, wall = time.process_time(), time.perf_counter()
    ids = decode.greedy_decode(policy, images, prompts, max_new_tokens, batch_size, stats=stats)
    texts = [t.strip() for t in policy.tokenizer.batch_decode(ids, skip_special_tokens=True)]
    _sync(device)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {"label": "engine", "texts": texts, "ids": ids, "stats": stats, "wall": wall, "cpu": cpu,
            "load": (load, os.getloadavg()[0])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="256x4")
    parser.add_argument("--benchmark", choices=["chair", "pope"], default="chair")
    parser.add_argument("--images", type=int, default=32, help="images (CHAIR) or questions (POPE)")
    parser.add_argument("--max-new-tokens", type=int, help="default: the benchmark's (CHAIR 512, POPE 128)")
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    parser.add_argument("--ends", choices=["chair", "model"], default="chair")
    parser.add_argument("--mean-length", type=float, help="default: CHAIR 130, POPE 2 (a word and EOS)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    tmp = tempfile.TemporaryDirectory()
    path = build_model(Path(tmp.name), args.size)
    chair = args.benchmark == "chair"
    args.max_new_tokens = args.max_new_tokens or (CHAIR_MAX_NEW_TOKENS if chair else POPE_MAX_NEW_TOKENS)
    args.mean_length = args.mean_length or (MEAN_LENGTH if chair else 2)
    images = make_images(args.images)
    prompts = [CHAIR_PROMPT] * len(images) if chair else pope_questions(len(images))
    if args.ends == "chair":
        set_eos(path, eos_for_mean_length(path, images, prompts, args.max_new_tokens, args.batch_size, args.device,
                                          args.mean_length))
    size = SIZES[args.size]
    image_tokens = (size.image_size // size.patch_size) ** 2 + 1
    print(f"text hidden {size.text_hidden} x {size.text_layers} layers, {image_tokens} image tokens, "
          f"device {args.device}, {args.threads} thread(s); {args.images} images, "
          + ("CHAIR prompt, " if chair else "POPE questions (prompts of different lengths), ") +
          f"max_new_tokens {args.max_new_tokens}, batch size {args.batch_size}, ends: {args.ends}"
          + (f" (mean {args.mean_length:g} asked)" if args.ends == "chair" else ""))

    runs = [run_generate(path, images, prompts, args.max_new_tokens, args.batch_size, args.device),
            run_engine(path, images, prompts, args.max_new_tokens, args.batch_size, args.device)]
    engine = runs[1]
    lengths = [len(row) for row in engine["ids"]]
    useful = sum(lengths)
    stats = engine["stats"]
    print(f"new tokens per response (up to and with EOS): mean {statistics.mean(lengths):.1f}, "
          f"min {min(lengths)}, max {max(lengths)}; {useful} in all; engine: {stats.forward_passes} decode "
          f"steps, {stats.prefills} prefills, {stats.rows_forwarded} rows decoded; generate (each batch until its "
          f"longest response ends): {generate_rows(lengths, args.batch_size)} rows decoded")
    for run in runs:
        print(f"{run['label']:>9}: {run['wall']:8.2f} s wall, {run['cpu']:8.2f} s CPU, "
              f"{run['wall'] / len(images):.3f} s/image, {useful / run['wall']:8.1f} tokens/s "
              f"(load {run['load'][0]:.1f} -> {run['load'][1]:.1f})")
    same = sum(a == b for a, b in zip(runs[0]["texts"], engine["texts"], strict=True))
    print(f"engine / generate: {runs[0]['wall'] / engine['wall']:.2f}x wall, "
          f"{runs[0]['cpu'] / engine['cpu']:.2f}x CPU; outputs identical: "
          f"{'yes' if same == len(images) else 'NO'} ({same}/{len(images)})")


if __name__ == "__main__":
    main()
