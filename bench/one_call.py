"""One node's expansion, timed on both sides: the release's `generate` call
(as sentence_level_beam_search_tree makes it) and the re-implementation's
`naive_expand`, on the root of the same prompt, 256x4 model, 1 thread,
CPU seconds split into prefill, decode steps and the rest; best of 3.

    python bench/one_call.py [--exact-rss]

--exact-rss applies the bench's CPU memory setting (measures._exact_cpu_rss)
to the re-implementation first, as bench_search.py did around timed runs
before it measured memory in a pass of its own (docs/performance.md).
The release side runs in the release venv (bench/make_release_venv.sh).
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
GEN = {"num_beams": 5, "num_beam_groups": 5, "diversity_penalty": 3.0, "max_new_tokens": 20}


class Split:
    """CPU seconds of each language-model forward pass, via hooks."""

    def __init__(self, language_model):
        self.passes: list[list[float]] = []
        language_model.register_forward_pre_hook(lambda *a, **k: self.passes.append([time.process_time()]))
        language_model.register_forward_hook(lambda *a, **k: self.passes[-1].append(time.process_time()))

    def line(self, name: str, total: float) -> str:
        times = [end - start for start, end in self.passes]
        return (f"{name}: {total:.3f} CPU s a call: prefill {times[0]:.3f}, {len(times) - 1} decode steps "
                f"{sum(times[1:]):.3f}, outside the model {total - sum(times):.3f}")


def release_side(policy_dir: Path, image_path: str, text: str, sentence_end: int) -> None:
    sys.path.insert(0, str(BENCH))
    from PIL import Image
    from release_search import load_model, load_tokenizers_and_processor

    model = load_model(policy_dir)
    _, _, processor = load_tokenizers_and_processor(policy_dir)
    image = Image.open(image_path).convert("RGB")
    split = Split(model.language_model)
    for _ in range(3):
        split.passes.clear()
        c0 = time.process_time()
        inputs = processor(text=text, images=image, return_tensors="pt")
        with torch.inference_mode():
            model.generate(**inputs, **GEN, eos_token_id=sentence_end, pad_token_id=0, num_return_sequences=5,
                           output_scores=True, return_dict_in_generate=True)
        print(split.line("release (generate)", time.process_time() - c0))


def csr_side(exact_rss: bool) -> None:
    sys.path.insert(0, str(BENCH))
    sys.path.insert(0, str(BENCH.parent))
    import bench_search as b
    from measures import _exact_cpu_rss

    from csr.engine.loading import load_policy
    from csr.engine.search.beam_search import BeamSettings
    from tests.reference_search import naive_expand

    root = Path(tempfile.mkdtemp(prefix="csr-one-call-"))
    policy_dir, _ = b.build_models(root, b.SIZES["256x4"])
    policy = load_policy(str(policy_dir))
    image = b.make_images(1)[0]
    image.save(root / "image.png")
    settings = BeamSettings(eos_token_id=policy.eos_token_id, sentence_end_ids=tuple(policy.sentence_end_ids),
                            num_beams=5, num_beam_groups=5, diversity_penalty=3.0)
    if exact_rss:
        _exact_cpu_rss()
    split = Split(policy.model.model.language_model)
    for _ in range(3):
        split.passes.clear()
        c0 = time.process_time()
        naive_expand(policy, image, b.PROMPTS[0], [[]], [GEN["max_new_tokens"]], settings)
        print(split.line(f"re-implementation{' (exact RSS)' if exact_rss else ''}", time.process_time() - c0))
    python = BENCH / "out" / "release-venv" / "bin" / "python"
    args = [str(policy_dir), str(root / "image.png"), policy.build_prompt(b.PROMPTS[0]), str(policy.sentence_end_ids[0])]
    subprocess.run([str(python), __file__, "--release", *args], check=True, env={"OMP_NUM_THREADS": "1", "PATH": ""})


if __name__ == "__main__":
    torch.set_num_threads(1)
    if sys.argv[1:2] == ["--release"]:
        release_side(Path(sys.argv[2]), sys.argv[3], sys.argv[4], int(sys.argv[5]))
    else:
        csr_side("--exact-rss" in sys.argv)
