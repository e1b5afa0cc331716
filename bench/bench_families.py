"""The search on a tiny random model of every family engine/models drives:
candidates/s and model-FLOPs utilisation of the shared-prefix search beside
the per-row one, and whether both gave the same trees.

    python bench/bench_families.py                       # every family, CPU, 1 thread
    python bench/bench_families.py --family Qwen2-VL --prompts 4 --device cuda

The models are engine/models/tiny.py's (text hidden 64 x 2 layers): the
figures compare paths and families on one machine, not real-model speed
(bench/bench_search.py measures LLaVA-shaped models at size). MFU counts the
decoder's linear layers only (2 x parameters x tokens the search ran, the
prompt prefill included), over the peak matmul FLOP/s measured in this run.
A family that cannot share the prefix (docs/models.md) runs per row in both.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from csr.engine.demo import tiny as demo_tiny
from csr.engine.loading import load_clip, load_policy
from csr.engine.models.tiny import BUILDERS, build_tiny
from csr.engine.search.batch_search import PromptJob, search_prompts
from csr.engine.search.sentence_search import ExpandStats, SearchConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measures import peak_matmul_flops, sync  # noqa: E402

PROMPTS = ["describe this image in detail .", "what colour is the square on the left ?"]


def _images(n: int) -> list[Image.Image]:
    g = torch.Generator().manual_seed(0)
    sizes = [(32, 32), (48, 24), (24, 56), (64, 40)]
    out = []
    for i in range(n):
        w, h = sizes[i % len(sizes)]
        out.append(Image.fromarray((torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy(), "RGB"))
    return out


def _decoder_linear_params(model) -> int:
    from csr.engine.models import adapter_for
    from csr.engine.train.lora import _find_module

    name = _find_module(model, adapter_for(model).language_model_names)
    decoder = model.get_submodule(name)
    return sum(m.weight.numel() for m in decoder.modules() if isinstance(m, torch.nn.Linear)) + \
        model.get_output_embeddings().weight.numel()


def _trees(results) -> list[list[str]]:
    return [[c.text for c in r.records] for r in results]


def bench(family: str, clip, args, peak: float, workdir: Path) -> str:
    model, processor = build_tiny(family)
    directory = demo_tiny.save_pretrained(model, processor, workdir / family.replace(" ", "_"))
    policy = load_policy(str(directory), device=args.device)
    config = SearchConfig(max_new_tokens=10, max_length=40)
    images = _images(args.prompts)
    jobs = [PromptJob(image, PROMPTS[i % len(PROMPTS)]) for i, image in enumerate(images)]
    search_prompts(policy, clip, jobs[:1], config.replace(max_new_tokens=3, max_length=6), 1 << 34)  # warm-up
    params = _decoder_linear_params(policy.model)
    cells, trees = [], {}
    for name, attention in (("shared", "cascade"), ("per-row", "plain")):
        stats = ExpandStats()
        sync(args.device)
        start = time.perf_counter()
        results = search_prompts(policy, clip, jobs, config, 1 << 34, attention, stats)
        sync(args.device)
        seconds = time.perf_counter() - start
        trees[name] = _trees(results)
        candidates = sum(len(r.records) for r in results)
        tokens = stats.tokens if stats.tokens else stats.rows_forwarded
        mfu = 2 * params * tokens / seconds / peak
        cells.append(f"{name} {candidates / seconds:7.1f} cand/s MFU {100 * mfu:.3f}%")
    same = "same trees" if trees["shared"] == trees["per-row"] else "TREES DIFFER"
    path = "shared prefix" if policy.adapter.per_row_reason is None else "per row only"
    return f"{family:22s} {path:13s} | " + " | ".join(cells) + f" | {same}"


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
          f"{args.prompts} prompts per family")
    with tempfile.TemporaryDirectory() as tmp:
        clip_model, clip_config = demo_tiny.build_tiny_clip()
        clip_dir = demo_tiny.save_open_clip(clip_model, clip_config, Path(tmp) / "clip")
        clip = load_clip(f"local-dir:{clip_dir}", device=args.device)
        for family in args.family or list(BUILDERS):
            print(bench(family, clip, args, peak, Path(tmp)), flush=True)


if __name__ == "__main__":
    main()
