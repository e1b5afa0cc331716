"""The authors' released sentence-level search, run as released.

    <release venv>/bin/python bench/release_search.py JOB.json

Run by bench/bench_search.py in the venv bench/make_release_venv.sh builds
(transformers 4.46, the torch of the project); it imports nothing of csr.
It loads `sentence_level_beam_search_tree` from inference_csr/sample.py of
the fetched repository github.com/YiyangZhou/CSR (read out of its git
directory at the commit the job names, unchanged), loads the tiny LLaVA the
bench saved, runs the function on each prompt and prints one JSON line:
seconds, candidates and call counts per prompt.

Shim, and why each piece is needed:
- The model is saved by transformers 5, whose CLIP vision tower has no
  `vision_model.` level: the state dict is renamed to 4.46's keys and loaded
  strictly (no random weight can slip in), the configs built from its json.
- The processor gets no `patch_size`: one `<image>` token in the text, the
  model expanding it into the image features (4.46's "legacy" path). The
  release needs this: each child node's text is the decoded *whole*
  sequence, fed back to the processor, so the `<image>` placeholder must
  come back once, not 577 times.
- `tokenizer` (the release's `base_tokenizer`, LLaVA-1.5's slow Llama
  tokenizer) decodes with skip_special_tokens=True and keeps `<image>`: on
  that tokenizer `<image>` is an added token but not one of the special
  tokens it skips (else the child's text would lose its image and 4.46
  would refuse it). Our word-level tokenizer marks `<image>` special, so the
  copy passed as `tokenizer` has that flag cleared; the one passed as
  `after_tokenizer` (their `model_tokenizer`) and inside the processor is the
  saved one.
- The prompt text is the one csr builds with the model's chat template
  (the same prefix tokens for both sides), not the release's vicuna system
  prompt: the search is measured, not the template.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def load_release(git_dir: str, commit: str, into: Path):
    """inference_csr/sample.py and utils.py at `commit`, imported as module `sample`."""
    for name in ("sample.py", "utils.py"):
        text = subprocess.run(
            ["git", f"--git-dir={git_dir}", "show", f"{commit}:inference_csr/{name}"],
            check=True, capture_output=True, text=True,
        ).stdout
        (into / name).write_text(text)
    sys.path.insert(0, str(into))
    return importlib.import_module("sample")


def load_model(policy_dir: Path):
    import torch
    from safetensors.torch import load_file
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    saved = json.loads((policy_dir / "config.json").read_text())
    text = dict(saved["text_config"])
    rope = text.pop("rope_parameters", None) or {}
    if "rope_theta" in rope:
        text["rope_theta"] = rope["rope_theta"]
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(**saved["vision_config"]),
        text_config=LlamaConfig(**text),
        image_token_index=saved.get("image_token_index", saved.get("image_token_id")),
        projector_hidden_act=saved["projector_hidden_act"],
        vision_feature_select_strategy=saved["vision_feature_select_strategy"],
        vision_feature_layer=saved["vision_feature_layer"],
        image_seq_length=saved.get("image_seq_length", 576),
    )
    config.pad_token_id = saved.get("pad_token_id")
    model = LlavaForConditionalGeneration(config).eval()
    state = {}
    for key, value in load_file(str(policy_dir / "model.safetensors")).items():
        if key.startswith("vision_tower.") and not key.startswith("vision_tower.vision_model."):
            key = "vision_tower.vision_model." + key[len("vision_tower."):]
        state[key] = value
    model.load_state_dict(state, strict=True)
    generation = json.loads((policy_dir / "generation_config.json").read_text())
    for name in ("pad_token_id", "eos_token_id", "bos_token_id"):
        if name in generation:
            setattr(model.generation_config, name, generation[name])
    return model.to(torch.float32)


def load_tokenizers_and_processor(policy_dir: Path):
    from transformers import CLIPImageProcessor, LlavaProcessor, PreTrainedTokenizerFast

    # model_input_names: as LLaVA-1.5's Llama tokenizer (no token_type_ids, which generate refuses).
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>",
               "model_input_names": ["input_ids", "attention_mask"]}
    saved = PreTrainedTokenizerFast(tokenizer_file=str(policy_dir / "tokenizer.json"), **special)
    spec = json.loads((policy_dir / "tokenizer.json").read_text())
    for token in spec["added_tokens"]:
        if token["content"] == "<image>":
            token["special"] = False
    base_file = policy_dir.parent / "release-base-tokenizer.json"
    base_file.write_text(json.dumps(spec))
    base = PreTrainedTokenizerFast(tokenizer_file=str(base_file), padding_side="left", **special)
    image_cfg = json.loads((policy_dir / "processor_config.json").read_text())["image_processor"]
    image_cfg.pop("image_processor_type", None)
    processor = LlavaProcessor(image_processor=CLIPImageProcessor(**image_cfg), tokenizer=saved)
    return saved, base, processor


class Counter:
    """What the model computes, via forward pre-hooks: `generate` calls (a
    prefill each), forward passes, positions prefilled (image features
    included, every beam row), rows decoded one token at a time, images
    through the vision tower."""

    def __init__(self, model):
        self.reset()
        model.language_model.register_forward_pre_hook(self._language, with_kwargs=True)
        model.vision_tower.register_forward_pre_hook(self._vision)

    def reset(self):
        self.generate_calls = self.forward_passes = self.prefill_positions = self.decode_rows = 0
        self.vision_images = 0

    def _language(self, module, args, kwargs):
        rows, positions = kwargs["inputs_embeds"].shape[:2]
        self.forward_passes += 1
        if positions > 1:
            self.generate_calls += 1
            self.prefill_positions += rows * positions
        else:
            self.decode_rows += rows

    def _vision(self, module, args):
        self.vision_images += int(args[0].shape[0])


def char_budget(tokenizer, processor, text: str, image, max_length_tokens: int) -> int:
    """The release bounds the decoded whole sequence in characters (1024 in
    step1.sh); csr bounds the response in tokens. The bench's bound in the
    release's terms: the decoded prompt, plus `max_length_tokens` times the
    mean characters of a vocabulary word and its space."""
    ids = processor(text=text, images=image, return_tensors="pt")["input_ids"][0]
    prompt_chars = len(tokenizer.decode(ids))
    words = [tokenizer.decode([i]) for i in range(len(tokenizer)) if i not in tokenizer.all_special_ids]
    per_token = sum(len(w) + 1 for w in words) / len(words)
    return prompt_chars + round(max_length_tokens * per_token)


def main() -> int:
    job = json.loads(Path(sys.argv[1]).read_text())
    import torch
    import transformers
    from PIL import Image

    torch.set_num_threads(job["threads"])
    torch.manual_seed(0)
    workdir = Path(tempfile.mkdtemp(prefix="csr-release-"))
    sample = load_release(job["git_dir"], job["commit"], workdir)
    policy_dir = Path(job["policy_dir"])
    model = load_model(policy_dir)
    saved_tok, base_tok, processor = load_tokenizers_and_processor(policy_dir)
    counter = Counter(model)
    s = job["search"]

    def run(prompt, max_new_tokens, max_length_tokens):
        image = Image.open(prompt["image"]).convert("RGB")
        max_length = char_budget(base_tok, processor, prompt["text"], image, max_length_tokens)
        return sample.sentence_level_beam_search_tree(
            prompt["id"], model, None, processor, base_tok, saved_tok, prompt["text"], image,
            s["sentence_end_id"], max_length, max_new_tokens,
            s["num_beams"], s["num_beam_groups"], s["num_token_beams"], s["diversity_penalty"],
        )[0]["tree"]

    run(job["prompts"][0], 4, 8)  # warm-up, untimed (as the bench warms csr up)
    results = []
    for prompt in job["prompts"]:
        counter.reset()
        load_before = os.getloadavg()[0]
        t0, c0 = time.perf_counter(), time.process_time()
        tree = run(prompt, s["max_new_tokens"], s["max_length"])
        seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
        nodes, stack, depth = [], [tree], 0
        while stack:
            node = stack.pop()
            depth = max(depth, node.depth)
            for child in node.children:
                nodes.append(child)
                stack.append(child)
        results.append({
            "seconds": seconds,
            "cpu_seconds": cpu_seconds,
            "candidates": len(nodes),
            "finals": sum(n.is_final for n in nodes),
            "depth": depth,
            "first_texts": [c.text for c in tree.children],
            "load_before": load_before,
            "load_after": os.getloadavg()[0],
            **{k: getattr(counter, k) for k in
               ("generate_calls", "forward_passes", "prefill_positions", "decode_rows", "vision_images")},
        })
    print(json.dumps({
        "transformers": transformers.__version__, "torch": torch.__version__,
        "threads": torch.get_num_threads(), "prompts": results,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
