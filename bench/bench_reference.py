"""DPO's reference log-probs: from the search tree or recomputed.

    python bench/bench_reference.py [--pairs 8] [--steps 8]

(a) Agreement: the search stores log pi_{N-1} of every generated token; for
    each final response, the stored sum against a teacher-forced float32
    forward of the same ids. Searched in float32 and in bfloat16; prints the
    largest difference of each. That is what `[train] reference = "auto"`
    relies on (the tree only for float32 trees).
(b) Cost: the same DPO run with `reference = "tree"` (no reference forward)
    and `"recompute"`; prints seconds per step and peak RSS growth of each.
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parents[1]))
from csr.engine.demo import tiny  # noqa: E402
from csr.engine.loading import load_clip, load_policy  # noqa: E402
from csr.engine.search.config import SearchConfig  # noqa: E402
from csr.engine.search.sentence_search import sentence_beam_search  # noqa: E402
from csr.engine.train.config import TrainConfig  # noqa: E402
from csr.engine.train.dpo import train_dpo  # noqa: E402
from csr.engine.train.dpo_data import PreferenceExample, completion_logprob  # noqa: E402
from tests.worlds import COLOURS, CORPUS  # noqa: E402

PROMPT = "Describe the image."
SEARCH = SearchConfig(max_new_tokens=8, max_length=32, num_token_beams=3, num_beam_groups=3, num_beams=3)


def agreement(policy_dir: Path, clip, images: list[Image.Image], dtype: str) -> tuple[float, list]:
    searched = load_policy(str(policy_dir), dtype=dtype)
    exact = load_policy(str(policy_dir), dtype="float32")
    worst, pairs = 0.0, []
    for image in images:
        result = sentence_beam_search(searched, clip, image, PROMPT, SEARCH)
        responses = sorted(result.responses, key=lambda r: r.logprob_sum)
        for r in responses:
            forced = completion_logprob(exact.model, exact.processor, image, PROMPT, r.token_ids)
            worst = max(worst, abs(forced - r.logprob_sum))
        if len(responses) >= 2:
            pairs.append((image, responses[-1], responses[0]))
    return worst, pairs


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reference", choices=("tree", "recompute", "both"), default="both",
                        help="one setting per process gives each its own peak RSS")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tokenizer = tiny.train_word_tokenizer(CORPUS)
        model, processor = tiny.build_tiny_llava(tokenizer, seed=1)
        policy_dir = tiny.save_pretrained(model, processor, root / "policy")
        clip_model, config = tiny.build_tiny_clip(seed=0)
        clip = load_clip(f"local-dir:{tiny.save_open_clip(clip_model, config, root / 'clip')}", None)
        colours = list(COLOURS.values())
        images = [Image.new("RGB", (40, 36), colours[i % len(colours)]) for i in range(args.pairs)]
        pairs = []
        for dtype in ("float32", "bfloat16"):
            worst, found = agreement(policy_dir, clip, images, dtype)
            print(f"search in {dtype:8s}: largest |stored - recomputed float32| log-prob of a response = {worst:.2e}")
            pairs = pairs or found
        examples = []
        for i, (image, chosen, rejected) in enumerate(pairs):
            path = root / f"{i}.png"
            image.save(path)
            examples.append(PreferenceExample(str(path), PROMPT, chosen.token_ids, rejected.token_ids,
                                              chosen.logprob_sum, rejected.logprob_sum))
        base = TrainConfig(learning_rate=1e-4, lora_r=8, lora_alpha=16, epochs=2, save_steps=1000,
                           gradient_checkpointing=False, warmup_ratio=0.0)
        for reference in ("tree", "recompute") if args.reference == "both" else (args.reference,):
            config = TrainConfig(**{**base.to_dict(), "reference": reference})
            before, started = rss_mib(), time.perf_counter()
            result = train_dpo(str(policy_dir), examples, root / f"m-{reference}", root / f"c-{reference}",
                               config, device="cpu")
            seconds = time.perf_counter() - started
            print(f"reference = {reference:9s}: {len(examples)} pairs x 2 epochs, {seconds / result.global_step:.3f} s "
                  f"per step, step-1 loss {result.metrics[0]['loss']:.6f}, peak RSS growth {rss_mib() - before:.0f} MiB")


if __name__ == "__main__":
    main()
