"""The batch search's schedule: one loop with continuous batching against the
threaded batch-by-batch search it replaced (commit 5cbdf75), on the same claim.

    .venv/bin/python bench/bench_batch_loop.py [--prompts 6] [--threads 2]

Both run the same model, the same prompts and the same KV budget. Two budgets:
"all": every prompt of the claim fits in one batch (the two schedules do the
same passes; the loop must not be slower); "two": two prompts fit at a time,
so when one tree ends before the other, the loop starts the next prompt at
once while the threaded search waits for the whole batch. Prints seconds,
forward passes and the threaded / loop ratio, and checks that both grow the
same trees. Each schedule runs twice (A B B A); the ratio takes the faster
run of each.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import torch

from csr.engine.demo import tiny
from csr.engine.loading import load_clip, load_policy
from csr.engine.search import batch_search, beam_search, expansion, records, sentence_search
from csr.engine.search import config as search_config
from csr.engine.search.batch_search import PromptJob, kv_bytes_per_prompt
from csr.engine.search.config import SearchConfig
from csr.engine.search.expansion import ExpandStats, PromptPrefix
from csr.engine.search.sentence_search import search_beam_settings

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_search import CLIP_CONFIG, PROMPTS, SIZES, WORDS, make_images  # noqa: E402

THREADED_COMMIT = "5cbdf75"
ROOT = Path(__file__).resolve().parents[1]


def threaded_module():
    """The threaded batch search as it was at THREADED_COMMIT, over today's tree logic."""
    source = subprocess.run(
        ["git", "-C", str(ROOT), "show", f"{THREADED_COMMIT}:engine/search/batch_search.py"],
        check=True, capture_output=True, text=True,
    ).stdout
    # The names it took from sentence_search live in several modules today.
    names = types.ModuleType("threaded_batch_search_names")
    for module in (records, search_config, beam_search, expansion, sentence_search):
        names.__dict__.update({k: v for k, v in vars(module).items() if not k.startswith("__")})
    sys.modules[names.__name__] = names
    source = source.replace("csr.engine.search.sentence_search import", f"{names.__name__} import")
    path = Path(tempfile.mkdtemp()) / "threaded_batch_search.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("threaded_batch_search", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def same_trees(a, b) -> bool:
    return all(
        [(r.parent_node, r.token_ids) for r in x.records] == [(r.parent_node, r.token_ids) for r in y.records]
        for x, y in zip(a, b, strict=True)
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="256x4")
    parser.add_argument("--prompts", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=12)
    parser.add_argument("--max-length", type=int, default=48)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = SearchConfig(max_new_tokens=args.max_new_tokens, max_length=args.max_length)

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = tiny.train_word_tokenizer([" ".join(WORDS), *PROMPTS])
        model, processor = tiny.build_tiny_llava(tokenizer, SIZES[args.size], seed=0)
        policy = load_policy(str(tiny.save_pretrained(model, processor, Path(tmp) / "policy")))
        clip_model, clip_config = tiny.build_tiny_clip(seed=0, config=CLIP_CONFIG)
        clip = load_clip(f"local-dir:{tiny.save_open_clip(clip_model, clip_config, Path(tmp) / 'clip')}", None)
    jobs = [PromptJob(image, PROMPTS[i % len(PROMPTS)]) for i, image in enumerate(make_images(args.prompts))]
    one = max(kv_bytes_per_prompt(policy.model, config, PromptPrefix(policy, j.image, j.prompt_text).length) for j in jobs)
    threaded = threaded_module()
    # The threaded schedule over today's token-level settings (masked ids, the preset's
    # sentence ends), so that only the schedule differs between the two.
    threaded.BeamSettings = lambda **_: search_beam_settings(policy, config)
    schedules = {"threaded": threaded.search_prompts, "loop": batch_search.search_prompts}
    schedules["loop"](policy, clip, jobs[:2], config.replace(max_new_tokens=4, max_length=8), 2 * one)  # warm-up

    print(
        f"{args.size} random LLaVA, {len(jobs)} prompts, {torch.get_num_threads()} threads, config "
        f"{config.to_dict()}, load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )
    print(f"{'budget':8} {'schedule':9} {'seconds':>8} {'passes':>7} {'depths':>24}")
    for label, budget in (("all", len(jobs) * one), ("two", 2 * one)):
        results, seconds = {}, {}
        # Each schedule twice, in the order A B B A, the faster run kept: on a shared
        # machine the load drifts during a run.
        for name in ("threaded", "loop", "loop", "threaded"):
            stats = ExpandStats()
            t0 = time.perf_counter()
            results[name] = schedules[name](policy, clip, jobs, config, budget, "cascade", stats)
            took = time.perf_counter() - t0
            seconds[name] = min(took, seconds.get(name, took))
            depths = [r.stats.depths for r in results[name]]
            print(f"{label:8} {name:9} {took:8.2f} {stats.forward_passes:7d} {str(depths):>24}")
        print(
            f"{label:8} threaded / loop: {seconds['threaded'] / seconds['loop']:.2f}x; "
            f"same trees: {same_trees(results['threaded'], results['loop'])}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
