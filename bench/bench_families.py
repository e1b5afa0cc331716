"""The search on a tiny random model of every family engine/models drives:
candidates/s and model-FLOPs utilisation of the shared-prefix search beside
the per-row one, and whether both gave the same trees.

    python bench/bench_families.py                       # every family, CPU, 1 thread
    python bench/bench_families.py --family Qwen2-VL --prompts 4 --device cuda

The models are engine/models/tiny.py's (text hidden 64 x 2 layers): the
figures compare paths and families on one machine, not real-model speed
(bench/bench_search.py measures LLaVA-shaped models at size). The useful
FLOPs are counted the same way for every family (bench/measures.py): the
decoder from its text config (hidden, layers, heads, kv heads, intermediate,
vocab) and the tokens and keys the search ran, the vision side from one
counted forward pass of each prompt; MFU is that over the time, over the
peak matmul FLOP/s measured in this run. Both paths do the same useful work
(the same tree); the bench checks their counts agree, and that the config's
count per token is 2 x the decoder's linear weights. A family that cannot
share the prefix (docs/models.md) runs per row in both.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from csr.engine.demo import tiny as demo_tiny
from csr.engine.loading import load_clip, load_policy
from csr.engine.models import ADAPTERS
from csr.engine.models.tiny import BUILDERS, build_tiny
from csr.engine.search.batch_search import PromptJob, search_prompts
from csr.engine.search.expansion import PromptPrefix
from csr.engine.search.sentence_search import ExpandStats, SearchConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measures import TextShape, image_flops, peak_matmul_flops, sync, useful_flops  # noqa: E402

PROMPTS = ["describe this image in detail .", "what colour is the square on the left ?"]
PATHS = (("shared", "cascade"), ("per-row", "plain"))
HEADER = ("| family | search path | text: hidden x layers, heads/kv, MLP, vocab | candidates | useful MFLOP "
          "| shared cand/s | shared MFU | per-row cand/s | per-row MFU | shared / per-row | same trees, same work |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|")


def _images(n: int) -> list[Image.Image]:
    g = torch.Generator().manual_seed(0)
    sizes = [(32, 32), (48, 24), (24, 56), (64, 40)]
    out = []
    for i in range(n):
        w, h = sizes[i % len(sizes)]
        out.append(Image.fromarray((torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy(), "RGB"))
    return out


def _trees(results) -> list[list[str]]:
    return [[c.text for c in r.records] for r in results]


def _work(stats: ExpandStats) -> tuple[int, int, int]:
    return stats.tokens, stats.attended, stats.logit_rows


def _decoder_linear_weights(policy) -> int:
    from csr.engine.train.lora import _find_module

    decoder = policy.model.get_submodule(_find_module(policy.model, policy.adapter.language_model_names))
    return sum(m.weight.numel() for m in decoder.modules() if isinstance(m, torch.nn.Linear))


def bench(family: str, clip, args, peak: float, workdir: Path) -> str:
    model, processor = build_tiny(family)
    directory = demo_tiny.save_pretrained(model, processor, workdir / family.replace(" ", "_"))
    policy = load_policy(str(directory), device=args.device)
    config = SearchConfig(max_new_tokens=10, max_length=40)
    jobs = [PromptJob(image, PROMPTS[i % len(PROMPTS)]) for i, image in enumerate(_images(args.prompts))]
    search_prompts(policy, clip, jobs[:1], config.replace(max_new_tokens=3, max_length=6), 1 << 34)  # warm-up
    seconds, results, stats = {}, {}, {}
    for name, attention in PATHS:
        stats[name] = ExpandStats()
        sync(args.device)
        start = time.perf_counter()
        results[name] = search_prompts(policy, clip, jobs, config, 1 << 34, attention, stats[name])
        sync(args.device)
        seconds[name] = time.perf_counter() - start
    prefix_lengths = [len(policy.encode(j.image, j.prompt_text)["input_ids"][0]) for j in jobs]
    image = sum(image_flops(policy, j.image, j.prompt_text) for j in jobs)
    flops = useful_flops(policy.model, prefix_lengths, image, stats["shared"])
    candidates = sum(len(r.records) for r in results["shared"])
    rate = {name: sum(len(r.records) for r in results[name]) / seconds[name] for name, _ in PATHS}
    same = _trees(results["shared"]) == _trees(results["per-row"]) and _work(stats["shared"]) == _work(stats["per-row"])
    shape = TextShape.of(policy.model)
    weights = _decoder_linear_weights(policy)
    if shape.linear_flops_per_token != 2 * weights:
        raise SystemExit(f"{family}: the text config counts {shape.linear_flops_per_token} FLOPs a token, "
                         f"its decoder's linear weights {2 * weights}: measures.TextShape does not fit this decoder")
    # What ran, not what the table says (a sliding cache falls back to the per-row path).
    shares = PromptPrefix(policy, jobs[0].image, jobs[0].prompt_text).shares_prefix
    cells = [family, "shared prefix" if shares else "per row only",
             f"{shape.hidden} x {shape.layers}, {shape.heads}/{shape.kv_heads}, {shape.intermediate}, {shape.vocab}",
             str(candidates), f"{flops / 1e6:.1f}"]
    for name, _ in PATHS:
        cells += [f"{rate[name]:.1f}", f"{100 * flops / seconds[name] / peak:.2f}%"]
    cells += [f"{rate['shared'] / rate['per-row']:.2f}x", "yes" if same else "NO"]
    return "| " + " | ".join(cells) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", action="append", choices=sorted(BUILDERS), help="default: every family")
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    peak = peak_matmul_flops(args.device, torch.float32)
    print(f"device {args.device}, {torch.get_num_threads()} threads, float32, peak matmul {peak / 1e9:.1f} GFLOP/s; "
          f"{args.prompts} prompts per family; load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(HEADER)
    with tempfile.TemporaryDirectory() as tmp:
        clip_model, clip_config = demo_tiny.build_tiny_clip()
        clip_dir = demo_tiny.save_open_clip(clip_model, clip_config, Path(tmp) / "clip")
        clip = load_clip(f"local-dir:{clip_dir}", device=args.device)
        for family in args.family or [a.family for a in ADAPTERS if a.family in BUILDERS]:
            print(bench(family, clip, args, peak, Path(tmp)), flush=True)
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
