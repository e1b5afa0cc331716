"""How far the search's per-token log-probs are from the model's own forward
pass on the Qwen-VL family, with the M-RoPE rows the adapter gives and with
plain 1-D rows (csr before engine/models: the issue's 1e-3..3e-3 drift).

    python bench/mrope_drift.py

Tiny random models of engine/models/tiny.py, float32, CPU, one thread;
three images of different sizes, two prompts, one expansion of 4 beams.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from csr.engine.demo.tiny import save_pretrained  # noqa: E402
from csr.engine.loading import load_policy  # noqa: E402
from csr.engine.models import base  # noqa: E402
from csr.engine.models.tiny import build_tiny  # noqa: E402
from csr.engine.search.expansion import PromptPrefix, expand_partials  # noqa: E402
from tests.test_families import PROMPTS, _forward_logprobs, _images, _settings  # noqa: E402


def main() -> None:
    torch.set_num_threads(1)
    for family in ("Qwen2-VL", "Qwen2.5-VL", "Qwen3-VL"):
        policy = load_policy(str(save_pretrained(*build_tiny(family), Path(tempfile.mkdtemp()))))
        for label in ("M-RoPE rows", "1-D rows"):
            if label == "1-D rows":
                a = policy.adapter
                policy.adapter = base.Adapter(family=a.family, model_types=a.model_types, hub_ids=a.hub_ids)
            worst = 0.0
            for image, prompt in zip(_images(), PROMPTS * 2, strict=False):
                for beams in expand_partials(PromptPrefix(policy, image, prompt), [[]], [8], _settings(policy)):
                    for beam in beams:
                        expected = _forward_logprobs(policy, image, prompt, beam.token_ids)
                        worst = max(worst, *(abs(x - y) for x, y in zip(beam.token_logprobs, expected, strict=True)))
            print(f"{family:11s} {label:12s} max |search - forward| per-token log-prob = {worst:.2e}")


if __name__ == "__main__":
    main()
