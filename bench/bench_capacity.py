"""Search capacity: candidates per prompt under each keep rule, on one model.

    python bench/bench_capacity.py [--prompts 4] [--threads 1]

The paper (appendix A.1) calls num_beams = 5 "the capacity of input at each
search layer": at most 5 partial responses are active. csr before revision
0003 kept the top 5 and the bottom 5 (up to 10 active); that rule is exactly
`keep_rule="paper"` with num_beams = 10 (top ceil(10/2) + bottom floor(10/2)
once more than 10 compete), so the "before" row is measured with the code of
today. The released code keeps 1 + 2. Same random model, prompts and images
for all rows (bench_search.py's model: 577 image tokens, sentences of up to 20
tokens, responses of up to 80).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_search import MIN_DEPTHS, PROMPTS, build_models, make_images  # noqa: E402

from csr.engine.loading import load_clip, load_policy  # noqa: E402
from csr.engine.search.config import RECORDED_BEFORE, SearchConfig  # noqa: E402
from csr.engine.search.sentence_search import sentence_beam_search  # noqa: E402

ROWS = (
    ("before: top 5 + bottom 5 (10 active)", SearchConfig(max_new_tokens=20, max_length=80, num_beams=10)),
    ("paper: 5 active (top 3 + bottom 2)", SearchConfig(max_new_tokens=20, max_length=80)),
    # The keep rule alone: the release's other rules (prompt, EOS, characters, ...) as the paper row has them.
    ("released code: 1 + 2 (reference-code)",
     SearchConfig(max_new_tokens=20, max_length=80, preset="reference-code", **RECORDED_BEFORE)),
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        policy_dir, clip_dir = build_models(Path(tmp))
        policy = load_policy(str(policy_dir))
        clip = load_clip(f"local-dir:{clip_dir}", None)
        # As bench_search.py: a random model sometimes degenerates at the first
        # token and the tree stops at once; such inputs measure nothing.
        inputs = []
        for i, image in enumerate(make_images(8 * args.prompts)):
            prompt = PROMPTS[i % len(PROMPTS)]
            probe = sentence_beam_search(policy, clip, image, prompt, SearchConfig(max_new_tokens=20, max_length=80))
            if probe.stats.depths >= MIN_DEPTHS:
                inputs.append((image, prompt))
            if len(inputs) == args.prompts:
                break
        print(f"{len(inputs)} prompts, {args.threads} thread(s)")
        for label, config in ROWS:
            counts, active, started = [], [], time.perf_counter()
            for image, prompt in inputs:
                result = sentence_beam_search(policy, clip, image, prompt, config)
                counts.append(result.stats.candidates)
                active.append(result.stats.max_active)
            seconds = time.perf_counter() - started
            print(f"  {label:40s} candidates/prompt {statistics.fmean(counts):7.1f} "
                  f"(per prompt {counts}), most active {max(active)}, {seconds:6.1f} s")


if __name__ == "__main__":
    main()
