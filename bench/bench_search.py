"""Search benchmark: the batched, cached sentence-level beam search against the
same algorithm computed the way the authors' released code computes it.

    python bench/bench_search.py                  # CPU, 1 thread, 3 prompts
    python bench/bench_search.py --threads 2      # an otherwise idle 2-core machine
    python bench/bench_search.py --device cuda

One process, one small model (a LLaVA-architecture model of a few million
parameters with LLaVA-like proportions: 577 image tokens, a ~20-token prompt,
sentences of up to 20 tokens, responses of up to 80), the same prompts and images for both:

(a) `sentence_beam_search`: the prompt prefix (vision tower + prompt tokens)
    runs once per prompt and its KV cache is copied; all active partial
    responses x token beams advance in one forward pass per token; the CLIP
    image embedding is computed once per image and each depth's sentences are
    scored in one text batch;
(b) `naive_sentence_beam_search`: each partial response expanded on its own,
    the image features and the whole prefix recomputed for each (on
    num_token_beams copies, as transformers' beam search expands its input
    before the first forward), the image re-encoded by CLIP for every
    sentence and each sentence scored alone.

Both must give the same candidates (texts exactly, scores within tolerance);
the bench prints candidates/s of each and the ratio. Then (c) the same prompts
go through the real generation worker (`run_worker`: claim, search, write the
whole tree in one transaction, mark done) against a fresh SQLite store, and the
bench prints the share of the worker's wall time spent in store writes. The two are run
alternately per prompt so that a noisy shared machine hurts both alike.

Threads: one by default. On a 2-core machine that other jobs share, two
intra-op threads oversubscribe the cores and the timing measures contention
(the same run took 8.7 min with 2 threads against 1.5 min with 1 at a load
average of 5); use --threads 2 on an idle machine.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from csr.engine import tiny
from csr.engine.loading import load_clip, load_policy
from csr.engine.search import SearchConfig, naive_sentence_beam_search, sentence_beam_search

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 180, 40),
    "blue": (30, 40, 220),
    "yellow": (230, 220, 30),
    "purple": (140, 40, 160),
    "white": (245, 245, 245),
}
PROMPTS = [
    "Describe the image in detail.",
    "What objects can you see in this picture, and where are they?",
    "Explain what is happening in the image.",
    "What is unusual about this image?",
]
# Enough words that "." is not the model's favourite token, as in a real vocabulary.
WORDS = (
    "the a an image picture photo shows there is are of in on at to with and near left right top "
    "bottom middle center small large big tiny round square circle triangle shape object objects "
    "background foreground colour color bright dark light red green blue yellow purple white black "
    "person people man woman child dog cat bird car bus bike tree house street road sky cloud sun "
    "grass water table chair window door wall floor sitting standing walking holding looking "
    "wearing playing parked next behind front above below between several two three many some "
    "appears seems likely possibly also which while where this that it its their they scene view "
    "detail details describe explain what happening unusual can you see and"
).split()

# Proportions follow LLaVA-1.5-7B: the language model dominates the FLOPs, the
# vision tower is a few percent of a prefill, the reward CLIP is small next to
# the policy (ViT-L/14-336: ~0.4 B parameters against 7 B).
POLICY_SIZE = tiny.TinyLlavaSize(
    image_size=192,
    patch_size=8,  # 24 x 24 patches (+ CLS) = 577 image tokens, as LLaVA-1.5's 576
    vision_hidden=96,
    vision_layers=2,
    vision_heads=4,
    text_hidden=384,
    text_layers=4,
    text_heads=6,
    text_intermediate=1024,
)
CLIP_CONFIG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 128, "layers": 2, "width": 128, "patch_size": 16, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 2},
}
CONFIG = SearchConfig(max_new_tokens=20, max_length=80)
# A random model sometimes repeats one word from the first token on: every depth-0
# candidate is then degenerate and the tree stops. Such prompts measure nothing,
# so inputs are screened (untimed) for a tree at least this deep.
MIN_DEPTHS = 3


def make_images(count: int, seed: int = 0) -> list[Image.Image]:
    rng = random.Random(seed)
    images = []
    for _ in range(count):
        colours = list(COLOURS.values())
        image = Image.new("RGB", (160, 140), rng.choice(colours))
        draw = ImageDraw.Draw(image)
        for _ in range(rng.randint(2, 4)):
            x, y = rng.randint(0, 110), rng.randint(0, 90)
            w, h = rng.randint(20, 50), rng.randint(20, 50)
            shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
            shape((x, y, x + w, y + h), fill=rng.choice(colours))
        images.append(image)
    return images


def build_models(root: Path) -> tuple[Path, Path]:
    tokenizer = tiny.train_word_tokenizer([" ".join(WORDS), *PROMPTS])
    model, processor = tiny.build_tiny_llava(tokenizer, POLICY_SIZE, seed=0)
    policy_dir = tiny.save_pretrained(model, processor, root / "policy")
    clip, config = tiny.build_tiny_clip(seed=0, config=CLIP_CONFIG)
    clip_dir = tiny.save_open_clip(clip, config, root / "clip")
    return policy_dir, clip_dir


def store_write_share(root: Path, policy_dir: Path, clip_dir: Path, images, prompts, device: str):
    """Run the prompts through the generation worker on a new SQLite store; its stats."""
    import json
    import threading

    from csr.engine.generation import WorkerOptions, iteration_config, run_worker
    from csr.engine.importing import import_prompts
    from csr.storage import work
    from csr.storage.store import create_store, register_base_model

    image_dir = root / "images"
    image_dir.mkdir()
    with (root / "prompts.jsonl").open("w") as handle:
        for i, (image, prompt) in enumerate(zip(images, prompts, strict=True)):
            image.save(image_dir / f"{i}.png")
            handle.write(json.dumps({"id": str(i), "image": f"{i}.png", "prompt": prompt}) + "\n")
    engine, _ = create_store(f"sqlite:///{root / 'bench.db'}")
    try:
        with engine.begin() as conn:
            register_base_model(conn, str(policy_dir), f"local-dir:{clip_dir}", None)
        import_prompts(engine, root / "prompts.jsonl", image_dir)
        preset, config = iteration_config(engine, 1, CONFIG.to_dict())
        work.start_iteration(engine, 1, preset, config)
        return run_worker(engine, 1, config, WorkerOptions(device=device, batch_prompts=len(prompts)),
                          stop=threading.Event())
    finally:
        engine.dispose()


def compare(a, b) -> list[str]:
    """Differences between two searches' candidate lists (empty when they agree)."""
    problems = []
    if len(a.records) != len(b.records):
        return [f"{len(a.records)} vs {len(b.records)} candidates"]
    for x, y in zip(a.records, b.records, strict=True):
        same = (x.parent_node, x.text, x.is_final, x.is_kept, x.exclusion_reason) == (
            y.parent_node,
            y.text,
            y.is_final,
            y.is_kept,
            y.exclusion_reason,
        )
        close = (
            abs(x.logprob_sum - y.logprob_sum) <= 1e-3
            and abs(x.r_i - y.r_i) <= 1e-2
            and abs(x.cumulative_reward - y.cumulative_reward) <= 1e-2
        )
        if not (same and close):
            problems.append(f"node {x.node}: {x} != {y}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--profile", action="store_true", help="torch profiler table of one batched search")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    tmp = tempfile.TemporaryDirectory()
    policy_dir, clip_dir = build_models(Path(tmp.name))
    policy = load_policy(str(policy_dir), device=args.device)
    clip = load_clip(f"local-dir:{clip_dir}", None, device=args.device)
    n_params = sum(p.numel() for p in policy.model.parameters())
    images, prompts = [], []
    for i, image in enumerate(make_images(4 * args.prompts)):
        prompt = PROMPTS[i % len(PROMPTS)]
        if sentence_beam_search(policy, clip, image, prompt, CONFIG).stats.depths >= MIN_DEPTHS:
            images.append(image)
            prompts.append(prompt)
        if len(images) == args.prompts:
            break
    print(
        f"policy {n_params / 1e6:.1f} M parameters, device {args.device}, {torch.get_num_threads()} threads; "
        f"config {CONFIG.to_dict()}"
    )

    # Warm-up (the screening above warmed the batched path): first calls allocate and pick kernels.
    naive_sentence_beam_search(policy, clip, images[0], prompts[0], SearchConfig(max_new_tokens=4, max_length=8))

    totals = {"batched": [0.0, 0, 0, 0.0, 0.0], "naive": [0.0, 0, 0, 0.0, 0.0]}
    mismatches = []
    for i, (image, prompt) in enumerate(zip(images, prompts, strict=True)):
        runs = {}
        order = ["batched", "naive"] if i % 2 == 0 else ["naive", "batched"]
        for name in order:
            fn = sentence_beam_search if name == "batched" else naive_sentence_beam_search
            t0 = time.perf_counter()
            runs[name] = fn(policy, clip, image, prompt, CONFIG)
            elapsed = time.perf_counter() - t0
            stats = runs[name].stats
            total = totals[name]
            total[0] += elapsed
            total[1] += len(runs[name].records)
            total[2] += stats.forward_passes
            total[3] += stats.model_seconds
            total[4] += stats.clip_seconds
        mismatches += compare(runs["batched"], runs["naive"])
        b, n = runs["batched"], runs["naive"]
        print(
            f"prompt {i}: {len(b.records)} candidates, depth {b.stats.depths}, "
            f"{b.stats.finals} final; batched {b.stats.total_seconds:.2f}s, naive {n.stats.total_seconds:.2f}s"
        )

    print()
    print(f"{'':10}{'seconds':>9}{'cands':>7}{'cands/s':>9}{'fwd passes':>12}{'model s':>9}{'clip s':>8}")
    rate = {}
    for name, (secs, cands, passes, model_s, clip_s) in totals.items():
        rate[name] = cands / secs
        print(f"{name:10}{secs:9.2f}{cands:7d}{rate[name]:9.1f}{passes:12d}{model_s:9.2f}{clip_s:8.2f}")
    print(f"\nspeed-up batched/naive: {rate['batched'] / rate['naive']:.1f}x")
    if mismatches:
        print(f"\nMISMATCH: {len(mismatches)} candidates differ, e.g.\n  " + "\n  ".join(mismatches[:3]))
    else:
        print("same candidates from both (texts exact, log-probs within 1e-3, R_I/cumulative within 1e-2)")

    worker = store_write_share(Path(tmp.name), policy_dir, clip_dir, images, prompts, args.device)
    tmp.cleanup()
    print(
        f"\nworker on an SQLite store: {worker.prompts_done} prompts, {worker.candidates} candidates in "
        f"{worker.wall_seconds:.2f} s ({worker.candidates / worker.wall_seconds:.1f} cands/s); search "
        f"{worker.search_seconds:.2f} s, store writes {worker.store_seconds:.3f} s"
    )
    # The worker's wall time includes loading both models once, which a real
    # run spreads over thousands of prompts: give the share both ways.
    print(
        f"store writes: {100 * worker.store_seconds / (worker.search_seconds + worker.store_seconds):.2f}% of "
        f"search + write time, {100 * worker.store_seconds / worker.wall_seconds:.2f}% of the worker's wall time"
    )

    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            sentence_beam_search(policy, clip, images[0], prompts[0], CONFIG)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))
    return 1 if mismatches else 0


if __name__ == "__main__":
    sys.exit(main())
