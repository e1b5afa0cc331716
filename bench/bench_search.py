"""Search benchmark: the authors' released search itself, the same algorithm
re-implemented the way the release computes it, and csr's batched search
with shared-prefix attention (and without), back to back in one run.

    python bench/bench_search.py --prompts 2                # 256x4 model, CPU, 1 thread, + the release
    python bench/bench_search.py --prompts 2 --threads 2 --preset reference-code
    python bench/bench_search.py --size 1b --device cuda --dtype bfloat16 --no-release

One random LLaVA-architecture model (`--size`: tiny, 256x4 = text hidden
256 x 4 layers with 577 image tokens as LLaVA-1.5's 576 + CLS, 384x4, 1b;
or --hidden/--layers/--heads/--image-tokens), saved to disk, the same
prompts and images for all; sentences of up to 20 tokens, responses of up
to 80:

(release) the authors' `sentence_level_beam_search_tree`, loaded unchanged
    from inference_csr/sample.py of github.com/YiyangZhou/CSR at run time,
    under transformers 4.46 in a venv of its own (bench/make_release_venv.sh;
    CSR_RELEASE_VENV, CSR_RELEASE_GIT), in a subprocess with the same thread
    count (bench/release_search.py, which says what its shim adapts). It
    ranks by the model's beam scores only; the release runs CLIP on the
    finished tree afterwards (score.py), which is not timed here. Skipped,
    with the reason printed, where the venv or the repository is missing.
(naive) the re-implementation (tests/reference_search.py): each partial
    response expanded on its own, image features and the whole prefix
    recomputed on num_token_beams copies (as `generate` expands its input),
    the image re-encoded by CLIP for every candidate;
(shared) `batch_search.search_prompts`: the prompt prefix (vision tower +
    prompt tokens) runs once per prompt and its KV is held once; the rows of
    every prompt of the batch (partials x token beams) advance in one
    forward pass per token, attending the prefix with one product per
    prompt and their own tokens separately (engine/search/cascade_attention.py);
    the CLIP image embedding is computed once per image;
(per-row) the same, one prompt at a time, the prefix KV copied into every
    row (the engine before shared-prefix attention).

naive, shared and per-row must give the same candidates (texts exactly,
scores within tolerance); the release must give the same depth-0 sentences
(the same model loaded on both sides). Printed: candidates/s, CPU seconds,
seconds per prompt and, for the release and naive, what they compute call
by call (generate calls, forward passes, positions prefilled, rows decoded,
images through the vision tower), the 1-minute load average before and
after each; the ratios against the release; the search's model-FLOPs
utilisation (useful FLOPs from the model's shapes and the tokens the search
needs, over the time, over the peak matmul FLOP/s measured in this run);
KV bytes (measured peak, and computed per prompt for a LLaVA-1.5-7B-shaped
model); peak memory (CUDA: allocator peak; CPU with --memory: resident-set
growth in an untimed pass after the timings). Then optionally (--worker)
the same prompts go through the generation worker against a fresh SQLite
store, and the bench prints the share of the worker's time spent in store
writes.

Threads: one by default. On a 2-core machine that other jobs share, two
intra-op threads oversubscribe the cores and the timing measures
contention; the CPU seconds (all threads of the process) are the steadier
figure there.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from csr.engine.demo import tiny
from csr.engine.loading import load_clip, load_policy
from csr.engine.search.batch_search import PromptJob, search_prompts
from csr.engine.search.cascade_attention import kv_bytes_per_token, text_shapes
from csr.engine.search.config import SearchConfig
from csr.engine.search.expansion import ExpandStats
from csr.engine.search.sentence_search import sentence_beam_search

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measures import PeakMemory, image_flops, peak_matmul_flops, sync, useful_flops_parts  # noqa: E402

# The released-code-style baseline is a test reference; the repository root makes `tests` importable.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.reference_search import CallCounts, naive_sentence_beam_search  # noqa: E402

BENCH = Path(__file__).resolve().parent
# The authors' release: the venv bench/make_release_venv.sh builds, and the git
# directory the `fetch` tool brings github:YiyangZhou/CSR into.
RELEASE_VENV = Path(os.environ.get("CSR_RELEASE_VENV", BENCH / "out" / "release-venv"))
RELEASE_GIT = Path(os.environ.get("CSR_RELEASE_GIT", "/work/.mirror/YiyangZhou+CSR/repo"))
COUNT_FIELDS = ("generate_calls", "forward_passes", "prefill_positions", "decode_rows", "vision_images")

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
# the policy (ViT-L/14-336: ~0.4 B parameters against 7 B). 24 x 24 patches
# + CLS = 577 image tokens, as LLaVA-1.5's 576.
SIZES = {
    "tiny": tiny.TinyLlavaSize(),
    "256x4": tiny.TinyLlavaSize(
        image_size=192, patch_size=8, vision_hidden=96, vision_layers=2, vision_heads=4,
        text_hidden=256, text_layers=4, text_heads=4, text_intermediate=688,
    ),
    "384x4": tiny.TinyLlavaSize(
        image_size=192, patch_size=8, vision_hidden=96, vision_layers=2, vision_heads=4,
        text_hidden=384, text_layers=4, text_heads=6, text_intermediate=1024,
    ),
    # ~0.9 B parameters: a GPU-sized check of the same code (LLaVA's 336 px / 14 px patches).
    "1b": tiny.TinyLlavaSize(
        image_size=336, patch_size=14, vision_hidden=1024, vision_layers=4, vision_heads=16,
        text_hidden=2048, text_layers=16, text_heads=16, text_intermediate=5632,
    ),
}
# LLaVA-1.5-7B's language model, for the computed KV figures.
LLAVA_7B = {"layers": 32, "kv_heads": 32, "head_dim": 128, "bytes": 2, "image_tokens": 576, "prompt_tokens": 24}
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


def build_models(root: Path, size: tiny.TinyLlavaSize = SIZES["384x4"]) -> tuple[Path, Path]:
    """The random policy (default: the size this bench used before --size, which
    bench_capacity.py keeps) and the reward CLIP, saved under `root`."""
    tokenizer = tiny.train_word_tokenizer([" ".join(WORDS), *PROMPTS])
    model, processor = tiny.build_tiny_llava(tokenizer, size, seed=0)
    policy_dir = tiny.save_pretrained(model, processor, root / "policy")
    clip, config = tiny.build_tiny_clip(seed=0, config=CLIP_CONFIG)
    clip_dir = tiny.save_open_clip(clip, config, root / "clip")
    return policy_dir, clip_dir


def model_size(args) -> tiny.TinyLlavaSize:
    size = SIZES[args.size]
    changes = {}
    if args.hidden:
        changes["text_hidden"] = args.hidden
        changes["text_intermediate"] = args.intermediate or int(args.hidden * 2.6875)
    elif args.intermediate:
        changes["text_intermediate"] = args.intermediate
    if args.layers:
        changes["text_layers"] = args.layers
    if args.heads:
        changes["text_heads"] = args.heads
    if args.image_tokens:
        side = math.isqrt(args.image_tokens)
        if side * side != args.image_tokens:
            raise SystemExit("--image-tokens must be a square number (side x side patches)")
        changes["image_size"] = side * size.patch_size
    return replace(size, **changes)


def kv_7b_lines(config: SearchConfig, rows: int) -> list[str]:
    """Computed KV bytes per prompt for a LLaVA-1.5-7B-shaped model (fp16)."""
    s = LLAVA_7B
    per_token = kv_bytes_per_token(s["layers"], s["kv_heads"], s["head_dim"], s["bytes"])
    prefix = s["image_tokens"] + s["prompt_tokens"]
    suffix = config.max_length + config.max_new_tokens
    before = rows * (prefix + suffix) * per_token
    after = (prefix + rows * suffix) * per_token
    gib = 2**30
    return [
        f"KV per token {per_token / 2**20:.2f} MiB (32 layers x 32 heads x 128 x K,V x fp16); "
        f"prefix {prefix} tokens, {rows} rows, each up to {suffix} response tokens:",
        f"  before (prefix in every row): {before / gib:.2f} GiB per prompt",
        f"  after  (prefix once):         {after / gib:.2f} GiB per prompt  ({before / after:.1f}x less)",
    ]


def store_write_share(root: Path, policy_dir: Path, clip_dir: Path, images, prompts, device: str, config):
    """Run the prompts through the generation worker on a new SQLite store; its stats."""
    import json

    from csr.engine.io.importing import import_prompts
    from csr.engine.worker_loop import WorkerOptions, iteration_config, run_worker
    from csr.storage import iterations
    from csr.storage.store import Store, create_store
    from csr.storage.versions import register_base_model

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
        import_prompts(Store(engine), root / "prompts.jsonl", image_dir)
        preset, frozen = iteration_config(Store(engine), 1, config.to_dict())
        iterations.start_iteration(engine, 1, preset, frozen)
        return run_worker(Store(engine), 1, frozen, WorkerOptions(device=device, batch_prompts=len(prompts)),
                          stop=threading.Event())
    finally:
        engine.dispose()


def run_release(args, policy, policy_dir: Path, root: Path, images, prompts, config) -> dict | str:
    """The authors' `sentence_level_beam_search_tree` on the same model, images
    and prompts, in a subprocess of the release venv (bench/release_search.py);
    its figures, or why it was skipped."""
    python = Path(args.release_venv) / "bin" / "python"
    if not python.exists():
        return f"no release venv at {args.release_venv} (build it: bash bench/make_release_venv.sh)"
    git_dir = Path(args.release_git)
    head = subprocess.run(["git", f"--git-dir={git_dir}", "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode != 0:
        return f"the release's repository is not at {git_dir} (fetch github:YiyangZhou/CSR; or set CSR_RELEASE_GIT)"
    if args.device != "cpu" or args.dtype != "float32":
        return "the release runs here on the CPU in float32 only"
    paths = []
    for i, image in enumerate(images):
        paths.append(root / f"release-{i}.png")
        image.save(paths[-1])
    job = {
        "git_dir": str(git_dir),
        "commit": head.stdout.strip(),
        "policy_dir": str(policy_dir),
        "threads": args.threads,
        "search": {
            "sentence_end_id": policy.sentence_end_ids[0],
            "max_new_tokens": config.max_new_tokens,
            "max_length": config.max_length,
            "num_beams": config.num_beams,
            "num_beam_groups": config.num_beam_groups,
            "num_token_beams": config.num_token_beams,
            "diversity_penalty": config.diversity_penalty,
        },
        "prompts": [
            {"id": str(i), "image": str(path), "text": policy.build_prompt(prompt)}
            for i, (path, prompt) in enumerate(zip(paths, prompts, strict=True))
        ],
    }
    (root / "release-job.json").write_text(json.dumps(job))
    threads = str(args.threads)
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "PYTHONWARNINGS": "ignore"}
    env.pop("PYTHONPATH", None)
    done = subprocess.run(
        [str(python), str(BENCH / "release_search.py"), str(root / "release-job.json")],
        capture_output=True, text=True, env=env,
    )
    if done.returncode != 0:
        return "the release failed:\n  " + "\n  ".join(done.stderr.strip().splitlines()[-5:])
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["commit"] = job["commit"]
    return result


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


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def print_release(release, runs, seconds, cpu, counts, loads, n_prompts: int, threads: int) -> None:
    """The release and csr's ways side by side: candidates/s, seconds per
    prompt, what each computed (call by call) and the load beside each.

    On a shared machine the wall clock measures the load as much as the
    search; the process's CPU seconds (all its threads) measure the work, so
    both are printed and compared."""
    print(f"\nagainst the authors' release{'' if release else ' (skipped: see above)'} "
          f"({threads} threads each; load = 1-min load average before -> after):")
    rows = {}
    if release:
        got = release["prompts"]
        rows["release"] = (
            sum(p["seconds"] for p in got),
            sum(p["cpu_seconds"] for p in got),
            sum(p["candidates"] for p in got),
            {k: sum(p[k] for p in got) for k in COUNT_FIELDS},
        )
        print(f"release: github.com/YiyangZhou/CSR@{release['commit'][:10]} inference_csr/sample.py "
              f"sentence_level_beam_search_tree, transformers {release['transformers']}, torch {release['torch']}, "
              f"{release['threads']} threads; depths {[p['depth'] for p in got]}; no CLIP in its search "
              f"(the release scores the finished tree afterwards, score.py)")
        firsts = ([r.text.strip() for r in res.records if r.depth == 0] for res in runs["shared"])
        same = sum(
            len(p["first_texts"]) == len(first)
            and all(t.endswith(f) for t, f in zip(p["first_texts"], first, strict=True))
            for p, first in zip(got, firsts, strict=True)
        )
        print(f"same model on both sides: depth-0 sentences identical on {same}/{len(got)} prompts")
    for name in runs:
        cands = sum(len(r.records) for r in runs[name])
        c = {k: getattr(counts[name], k) for k in COUNT_FIELDS} if name in counts else None
        rows[name] = (seconds[name], cpu[name], cands, c)
    header = ["seconds", "cpu s", "s/prompt", "cands", "cands/s", "cands/cpu-s",
              "gen calls", "fwd passes", "prefill pos", "decode rows", "vision img"]
    print(f"{'':9}" + "".join(f"{h:>12}" for h in header) + "   load")
    for name, (secs, cpu_s, cands, c) in rows.items():
        cells = [f"{secs:.2f}", f"{cpu_s:.2f}", f"{secs / n_prompts:.2f}", f"{cands}", f"{cands / secs:.2f}",
                 f"{cands / cpu_s:.2f}"]
        cells += [f"{c[k]}" for k in COUNT_FIELDS] if c else ["-"] * len(COUNT_FIELDS)
        print(f"{name:9}" + "".join(f"{x:>12}" for x in cells) + f"   {loads[name][0]} -> {loads[name][1]}")
    if "naive" in runs:
        clip_s = sum(r.stats.clip_seconds for r in runs["naive"])
        print(f"naive: CLIP {clip_s:.2f} s of {seconds['naive']:.2f} s ({counts['naive'].clip_image_encodes} "
              f"image encodes, one per candidate)")
    if "release" not in rows:
        return
    r_secs, r_cpu, r_cands, _ = rows["release"]
    for name in runs:
        secs, cpu_s, cands, _ = rows[name]
        print(f"{name}/release: {cands / secs / (r_cands / r_secs):.2f}x candidates/s "
              f"({cands / cpu_s / (r_cands / r_cpu):.2f}x per CPU second), {r_secs / secs:.2f}x per prompt "
              f"({secs / n_prompts:.1f} s against {r_secs / n_prompts:.1f} s)")
    if "naive" in runs:
        secs, cpu_s, cands, _ = rows["naive"]
        gap = cands / secs / (r_cands / r_secs) - 1
        gap_cpu = cands / cpu_s / (r_cands / r_cpu) - 1
        verdict = "within" if abs(gap) <= 0.2 else "NOT within"
        print(f"re-implementation against release: {100 * gap:+.0f} % candidates/s ({verdict} 20 %), "
              f"{100 * gap_cpu:+.0f} % per CPU second")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="256x4")
    parser.add_argument("--hidden", type=int, help="text hidden size (overrides --size)")
    parser.add_argument("--layers", type=int, help="text layers (overrides --size)")
    parser.add_argument("--heads", type=int, help="text attention heads (overrides --size)")
    parser.add_argument("--intermediate", type=int, help="text MLP width (overrides --size)")
    parser.add_argument("--image-tokens", type=int, help="image patches, a square number (overrides --size)")
    parser.add_argument("--prompts", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--kv-budget", type=float, help="KV-cache budget in GiB (default: from free memory)")
    parser.add_argument("--max-new-tokens", type=int, default=20)
    parser.add_argument("--max-length", type=int, default=80)
    parser.add_argument("--no-naive", action="store_true", help="skip the released-code-style re-implementation")
    parser.add_argument("--preset", choices=["paper", "reference-code"], default="paper",
                        help="search preset of csr's runs (reference-code: the release's selection and slicing)")
    parser.add_argument("--no-release", action="store_true", help="skip the authors' release")
    parser.add_argument("--release-venv", default=str(RELEASE_VENV), help="venv of bench/make_release_venv.sh")
    parser.add_argument("--release-git", default=str(RELEASE_GIT), help="git directory of github:YiyangZhou/CSR")
    parser.add_argument("--worker", action="store_true", help="also run the generation worker on a store")
    parser.add_argument("--memory", action="store_true",
                        help="CPU: measure each variant's peak memory in an untimed pass after the timings")
    parser.add_argument("--profile", action="store_true", help="torch profiler table of the shared search of one prompt")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = SearchConfig(max_new_tokens=args.max_new_tokens, max_length=args.max_length, preset=args.preset)
    size = model_size(args)
    budget = None if args.kv_budget is None else int(args.kv_budget * 2**30)

    tmp = tempfile.TemporaryDirectory()
    policy_dir, clip_dir = build_models(Path(tmp.name), size)
    policy = load_policy(str(policy_dir), device=args.device, dtype=args.dtype)
    clip = load_clip(f"local-dir:{clip_dir}", None, device=args.device)
    n_params = sum(p.numel() for p in policy.model.parameters())
    image_tokens = (size.image_size // size.patch_size) ** 2
    images, prompts = [], []
    for i, image in enumerate(make_images(4 * args.prompts)):
        prompt = PROMPTS[i % len(PROMPTS)]
        if sentence_beam_search(policy, clip, image, prompt, config).stats.depths >= MIN_DEPTHS:
            images.append(image)
            prompts.append(prompt)
        if len(images) == args.prompts:
            break
    if not images:
        print("no prompt gave a tree of depth >= 3 with this random model; nothing to measure")
        return 1
    layers, kv_heads, head_dim = text_shapes(policy.model)
    print(
        f"policy {n_params / 1e6:.1f} M parameters (text hidden {size.text_hidden} x {layers} layers, "
        f"{image_tokens} image tokens + CLS), {args.dtype}, device {args.device}, "
        f"{torch.get_num_threads()} threads; {len(images)} prompts; config {config.to_dict()}"
    )
    print(f"load average before: {_load()}")
    peak = peak_matmul_flops(args.device, policy.model.dtype)
    print(f"peak matmul: {peak / 1e9:.1f} GFLOP/s ({policy.model.dtype}, measured now)")

    # Warm-up (the screening above warmed the per-prompt path).
    jobs = [PromptJob(image, prompt) for image, prompt in zip(images, prompts, strict=True)]
    search_prompts(policy, clip, jobs[:2], config.replace(max_new_tokens=4, max_length=8), budget)
    if not args.no_naive:
        naive_sentence_beam_search(policy, clip, images[0], prompts[0], config.replace(max_new_tokens=4, max_length=8))

    # The release first (its own process and model), then csr's ways, back to back.
    loads: dict[str, tuple[str, str]] = {}
    release = None
    if not args.no_release:
        before = _load()
        release = run_release(args, policy, policy_dir.resolve(), Path(tmp.name), images, prompts, config)
        loads["release"] = (before, _load())
        if isinstance(release, str):
            print(f"release skipped: {release}")
            release = None
    variants = (["naive"] if not args.no_naive else []) + ["shared", "per-row"]
    runs, seconds, cpu, memory, stats, counts = {}, {}, {}, {}, {}, {}

    def search(name: str, expand_stats: ExpandStats, call_counts: CallCounts | None):
        if name == "shared":
            return search_prompts(policy, clip, jobs, config, budget, "cascade", expand_stats)
        if name == "per-row":
            return search_prompts(policy, clip, jobs, config, budget, "plain", expand_stats)
        return [naive_sentence_beam_search(policy, clip, j.image, j.prompt_text, config, call_counts) for j in jobs]

    cuda = args.device.startswith("cuda")
    for name in variants:
        stats[name] = ExpandStats()
        if name == "naive":
            counts[name] = CallCounts()
        before = _load()
        # On the CPU, memory is measured in a pass of its own after all timings
        # (--memory): its exact-RSS setting (measures._exact_cpu_rss) maps every
        # tensor over 128 KiB afresh, page faults and all, which cost the
        # recomputing baseline about 50 % more CPU time per prefill.
        with PeakMemory(args.device) if cuda else contextlib.nullcontext() as mem:
            t0, c0 = time.perf_counter(), time.process_time()
            runs[name] = search(name, stats[name], counts.get(name))
            sync(args.device)
            seconds[name] = time.perf_counter() - t0
            cpu[name] = time.process_time() - c0
        memory[name] = mem.peak if cuda else None
        loads[name] = (before, _load())
    if not cuda and args.memory:
        for name in variants:
            with PeakMemory(args.device) as mem:
                search(name, ExpandStats(), None)
            memory[name] = mem.peak
    print(f"load average after: {_load()}")
    for name in variants:
        failed = [r for r in runs[name] if isinstance(r, BaseException)]
        if failed:
            raise failed[0]

    mismatches = []
    for name in variants:
        if name == "shared":
            continue
        for a, b in zip(runs["shared"], runs[name], strict=True):
            mismatches += [f"{name}: {m}" for m in compare(a, b)]
    for i, result in enumerate(runs["shared"]):
        print(f"prompt {i}: {len(result.records)} candidates, depth {result.stats.depths}, {result.stats.finals} final")

    prefix_lengths = [len(policy.encode(j.image, j.prompt_text)["input_ids"][0]) for j in jobs]
    image = sum(image_flops(policy, j.image, j.prompt_text) for j in jobs)
    parts = useful_flops_parts(policy.model, prefix_lengths, image, stats["shared"])
    flops = sum(parts.values())
    print(f"\nuseful work: {flops / 1e9:.2f} GFLOP for the whole search (same for every variant): "
          + ", ".join(f"{name} {value / 1e9:.2f}" for name, value in parts.items()))
    print(f"at the measured peak matmul rate that is {flops / peak:.3f} s"
          + (f": the most any search of these trees can gain on the released-code style here is "
             f"{seconds['naive'] * peak / flops:.1f}x" if "naive" in seconds else ""))
    print(f"{'':9}{'seconds':>9}{'cands':>7}{'cands/s':>9}{'fwd passes':>12}{'MFU':>8}{'peak mem':>11}{'KV peak':>10}")
    rate = {}
    mib = 2**20
    for name in variants:
        cands = sum(len(r.records) for r in runs[name])
        rate[name] = cands / seconds[name]
        passes = stats[name].forward_passes or sum(r.stats.forward_passes for r in runs[name])
        kv = f"{stats[name].peak_kv_bytes / mib:8.1f}M" if stats[name].peak_kv_bytes else f"{'-':>9}"
        mfu = flops / seconds[name] / peak
        print(
            f"{name:9}{seconds[name]:9.2f}{cands:7d}{rate[name]:9.1f}{passes:12d}{100 * mfu:7.2f}%"
            + (f"{memory[name] / mib:10.1f}M" if memory[name] is not None else f"{'-':>11}")
            + f"{kv:>10}"
        )
    if "naive" in rate:
        print(f"\nspeed-up shared/naive: {rate['shared'] / rate['naive']:.1f}x   "
              f"per-row/naive: {rate['per-row'] / rate['naive']:.1f}x")
    print(f"speed-up shared/per-row: {rate['shared'] / rate['per-row']:.2f}x")
    print_release(release, runs, seconds, cpu, counts, loads, len(jobs), args.threads)
    exact = policy.model.dtype == torch.float32
    if mismatches:
        print(f"\nMISMATCH: {len(mismatches)} candidates differ, e.g.\n  " + "\n  ".join(mismatches[:3]))
        if not exact:  # half precision rounds differently in each path's attention order
            print(f"({policy.model.dtype}: informational; the paths agree exactly in float32 only)")
    else:
        print("same candidates from all (texts exact, log-probs within 1e-3, R_I/cumulative within 1e-2)")

    rows = config.num_beams * config.num_token_beams  # the capacity of a search layer x token beams
    print(
        f"\nKV peak of one batch, measured: per-row {stats['per-row'].peak_kv_bytes / mib:.1f} MiB (one prompt), "
        f"shared {stats['shared'].peak_kv_bytes / mib:.1f} MiB ({len(jobs)} prompts)"
    )
    print(f"KV per token of this model: {kv_bytes_per_token(layers, kv_heads, head_dim, policy.model.dtype.itemsize)} B")
    for line in kv_7b_lines(config, rows):
        print(line)

    if args.worker:
        worker = store_write_share(Path(tmp.name), policy_dir, clip_dir, images, prompts, args.device, config)
        print(
            f"\nworker on an SQLite store: {worker.prompts_done} prompts, {worker.candidates} candidates in "
            f"{worker.wall_seconds:.2f} s ({worker.candidates / worker.wall_seconds:.1f} cands/s); search "
            f"{worker.search_seconds:.2f} s, store writes {worker.store_seconds:.3f} s"
        )
        print(
            f"store writes: {100 * worker.store_seconds / (worker.search_seconds + worker.store_seconds):.2f}% "
            f"of search + write time, {100 * worker.store_seconds / worker.wall_seconds:.2f}% of the worker's wall time"
        )
    tmp.cleanup()

    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        # One prompt: its driver runs in this thread, which the profiler records
        # (the drivers of a pooled batch run in threads of their own).
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            search_prompts(policy, clip, jobs[:1], config, budget)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))
    return 1 if mismatches and exact else 0


if __name__ == "__main__":
    sys.exit(main())
