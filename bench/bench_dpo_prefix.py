"""DPO training step: prefix-shared forward (the prompt and image once per
pair) against TRL's concatenated forward (two rows, each with the whole
prompt), back to back in one run.

    python bench/bench_dpo_prefix.py                       # both shapes, CPU, 1 thread
    python bench/bench_dpo_prefix.py --shapes 2880 --steps 5 --reference recompute
    python bench/bench_dpo_prefix.py --device cuda --dtype bfloat16 --size 1b
    python bench/bench_dpo_prefix.py --size tiny --steps 1    # seconds: a dry run

One random LLaVA-architecture model (`--size` 256x4: text hidden 256 x 4
layers, the search bench's shape; LLaVA-1.5's "default" feature strategy, so
24 x 24 patches = 576 image tokens per image). Shapes:

  576   one image per prompt: 576 image tokens (LLaVA-1.5);
  2880  five 576-token crops per prompt: 2,880 image tokens, the vision
        tower run on five crops (LLaVA-NeXT's anyres at 672 x 672, less its
        48 row-end tokens).

(`--size 1b`: 24 x 24 patches of 14 px, the same counts; `--size tiny`: 16
image tokens a crop.) Each pair: a ~10-token prompt around the image tokens, a 100-token chosen and
a 92-token rejected response (random ids; `--chosen-tokens`,
`--rejected-tokens`; `--pairs` pairs per step). One
step = TRL's `training_step` (loss, backward) through csr's own trainer
(engine/train/dpo.py make_trainer), the csr defaults (LoRA r 128 on the
seven decoder projections, the projector trained in full, gradient
checkpointing) but LoRA dropout 0, so that the two forwards must give the
same loss. Reference log-probs: from the tree (`--reference tree`, csr's
float32 default: no reference pass) or recomputed (adapter off, one more
forward without gradient).

Printed per shape and forward: tokens/s (the pair's tokens as the
concatenated forward counts them, prompt twice plus both responses, for
both forwards, so the ratio is the ratio of steps per second), seconds per
step (median of `--steps`, the two forwards alternating), the same per CPU
second of the process (steadier where other jobs share the cores), and peak memory
of a step above the memory before it (CPU: resident-set high-water mark,
reset before each step; CUDA: allocator peak). Then the ratio, and the
largest loss and gradient differences between the two, measured in the same
run.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from csr.engine.demo import tiny
from csr.engine.train import prefix_shared
from csr.engine.train.config import TrainConfig
from csr.engine.train.dpo import make_trainer
from csr.engine.train.dpo_data import PreferenceExample
from csr.engine.train.lora import lora_setup

SIZES = {
    # bench/bench_search.py's tiny (bench/device_check.sh's CPU dry run: 16 image tokens a crop), 256x4 and 1b shapes.
    "tiny": tiny.TinyLlavaSize(),
    "256x4": tiny.TinyLlavaSize(
        image_size=192, patch_size=8, vision_hidden=96, vision_layers=2, vision_heads=4,
        text_hidden=256, text_layers=4, text_heads=4, text_intermediate=688,
    ),
    "1b": tiny.TinyLlavaSize(
        image_size=336, patch_size=14, vision_hidden=1024, vision_layers=4, vision_heads=16,
        text_hidden=2048, text_layers=16, text_heads=16, text_intermediate=5632,
    ),
}
CROPS = {"576": 1, "2880": 5}
LIBC = ctypes.CDLL("libc.so.6")
WORDS = ("the a image picture shows there is are of in on red green blue square circle left right top bottom "
         "person dog cat car tree house sky grass water table window door sitting standing two three many "
         "describe detail what colour background small large near behind front and with").split()
PROMPT = "Describe the image in detail."
CHOSEN_TOKENS, REJECTED_TOKENS = 100, 92


def build(root: Path, size: tiny.TinyLlavaSize) -> Path:
    tokenizer = tiny.train_word_tokenizer([" ".join(WORDS), PROMPT])
    model, processor = tiny.build_tiny_llava(tokenizer, size, seed=0)
    # LLaVA-1.5's own strategy: the CLS feature dropped, 24 x 24 = 576 tokens an image.
    model.config.vision_feature_select_strategy = "default"
    processor.vision_feature_select_strategy = "default"
    return tiny.save_pretrained(model, processor, root / "policy")


def crops(count: int, side: int, seed: int) -> list[Image.Image]:
    rng = random.Random(seed)
    images = []
    for _ in range(count):
        image = Image.new("RGB", (side, side), tuple(rng.randrange(256) for _ in range(3)))
        draw = ImageDraw.Draw(image)
        for _ in range(4):
            x, y = rng.randrange(side // 2), rng.randrange(side // 2)
            draw.rectangle((x, y, x + side // 3, y + side // 3), fill=tuple(rng.randrange(256) for _ in range(3)))
        images.append(image)
    return images


def make_batch(processor, n_crops: int, pairs: int, side: int, seed: int,
               lengths: tuple[int, int] = (CHOSEN_TOKENS, REJECTED_TOKENS)) -> dict:
    """A prefix-shared batch: `n_crops` image-token blocks per prompt."""
    rng = random.Random(seed)
    ids = [i for w in WORDS if (i := processor.tokenizer.convert_tokens_to_ids(w)) is not None]
    eos = processor.tokenizer.eos_token_id
    text = f"USER: {'<image>' * n_crops}\n{PROMPT} ASSISTANT:"
    encoded = processor(text=[text] * pairs, images=crops(n_crops * pairs, side, seed), padding=True,
                        padding_side="left", return_tensors="pt")
    chosen = [[rng.choice(ids) for _ in range(lengths[0] - 1)] + [eos] for _ in range(pairs)]
    rejected = [[rng.choice(ids) for _ in range(lengths[1] - 1)] + [eos] for _ in range(pairs)]
    batch = prefix_shared.pair_batch(encoded, chosen, rejected, processor.tokenizer.pad_token_id)
    batch["ref_chosen_logps"] = torch.full((pairs,), -float(lengths[0]) * 4)
    batch["ref_rejected_logps"] = torch.full((pairs,), -float(lengths[1]) * 4)
    return batch


def trainer_for(model_dir: Path, forward: str, reference: str, device: str, bf16: bool, root: Path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    config = TrainConfig(lora_dropout=0.0, forward=forward, reference=reference, bf16=bf16)
    processor = AutoProcessor.from_pretrained(model_dir)
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32)
    lora, _ = lora_setup(model, config)
    image = root / "image.png"
    Image.new("RGB", (8, 8)).save(image)
    ref = -1.0 if reference == "tree" else None  # make_trainer reads the reference from the examples
    examples = [PreferenceExample(str(image), PROMPT, [1], [1], ref, ref)]
    trainer, _, shared = make_trainer(model, processor, examples, config, lora, root / forward, bf16, device)
    assert shared == (forward == "prefix-shared")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # LoRA's B starts at zero; a trained adapter does not
        for name, param in sorted(trainer.model.named_parameters()):
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator).to(param.device) * 0.01)
    trainer.current_gradient_accumulation_steps = 1
    trainer.model.activation_checkpointing_enable()
    trainer.model.train()
    return trainer


def _proc_status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def step(trainer, batch: dict, device: str) -> tuple[float, float, float, int]:
    """(seconds, CPU seconds, loss, peak bytes above the step's start) of one training step."""
    trainer.model.zero_grad(set_to_none=True)
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        # Memory the last step freed goes back to the system, so that this
        # step's allocations show in the resident set; then VmHWM restarts there.
        LIBC.malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = _proc_status("VmRSS")
    started, cpu = time.perf_counter(), time.process_time()
    # trainer.train() runs the model under the accelerator's autocast (bf16); so does the bench.
    with trainer.accelerator.autocast():
        loss = trainer.training_step(trainer.model, dict(batch))
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = _proc_status("VmHWM") - base
    return time.perf_counter() - started, time.process_time() - cpu, float(loss), peak


def grads(trainer) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().float().cpu().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}


def run_shape(shape: str, args, model_dir: Path, size: tiny.TinyLlavaSize, root: Path) -> float:
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(model_dir)
    lengths = (args.chosen_tokens, args.rejected_tokens)
    shared_batch = make_batch(processor, CROPS[shape], args.pairs, size.image_size, seed=int(shape), lengths=lengths)
    batches = {"prefix-shared": shared_batch, "concatenated": prefix_shared.concatenated_batch(shared_batch)}
    if args.reference == "recompute":
        for b in batches.values():
            b.pop("ref_chosen_logps"), b.pop("ref_rejected_logps")
    bf16 = args.dtype == "bfloat16"
    trainers = {f: trainer_for(model_dir, f, args.reference, args.device, bf16, root) for f in batches}
    tokens = int(shared_batch["attention_mask"].sum())
    image_tokens = int((shared_batch["input_ids"][0] == processor.tokenizer.convert_tokens_to_ids("<image>")).sum())
    unique = int(shared_batch[prefix_shared.LAYOUT_KEY]["input_ids"].numel())
    print(f"\nshape {shape}: {args.pairs} pair(s) a step, {image_tokens} image tokens a prompt, responses "
          f"{lengths[0]}/{lengths[1]} tokens; concatenated rows {tuple(shared_batch['input_ids'].shape)} "
          f"({tokens} tokens), prefix-shared rows {tuple(shared_batch[prefix_shared.LAYOUT_KEY]['input_ids'].shape)} "
          f"({unique} positions)", flush=True)
    first = {}
    for forward, trainer in trainers.items():  # warm-up step, kept for the equality check
        _, _, loss, _ = step(trainer, batches[forward], args.device)
        first[forward] = (loss, grads(trainer))
    times: dict[str, list[float]] = {f: [] for f in trainers}
    cpu: dict[str, list[float]] = {f: [] for f in trainers}
    peaks: dict[str, list[int]] = {f: [] for f in trainers}
    for _ in range(args.steps):
        for forward, trainer in trainers.items():
            seconds, cpu_seconds, _, peak = step(trainer, batches[forward], args.device)
            times[forward].append(seconds)
            cpu[forward].append(cpu_seconds)
            peaks[forward].append(peak)
    per_s, per_cpu_s = {}, {}
    for forward in trainers:
        median, cpu_median = statistics.median(times[forward]), statistics.median(cpu[forward])
        per_s[forward], per_cpu_s[forward] = tokens / median, tokens / cpu_median
        print(f"  {forward:>14}: {per_s[forward]:8.0f} tokens/s  {median:7.3f} s/step "
              f"(steps {', '.join(f'{t:.3f}' for t in times[forward])}); {per_cpu_s[forward]:8.0f} tokens/CPU-s "
              f"{cpu_median:7.3f} CPU-s/step; peak +{max(peaks[forward]) / 2**20:7.1f} MiB", flush=True)
    ratio = per_s["prefix-shared"] / per_s["concatenated"]
    cpu_ratio = per_cpu_s["prefix-shared"] / per_cpu_s["concatenated"]
    (loss_c, grads_c), (loss_s, grads_s) = first["concatenated"], first["prefix-shared"]
    worst = max((grads_s[n] - g).abs().max().item() / max(g.abs().max().item(), 1e-30) for n, g in grads_c.items())
    print(f"  prefix-shared / concatenated: {ratio:.2f}x tokens/s ({cpu_ratio:.2f}x per CPU second), peak memory "
          f"{max(peaks['prefix-shared']) / max(max(peaks['concatenated']), 1):.2f}x; "
          f"loss {loss_s:.9g} vs {loss_c:.9g} (rel. diff {abs(loss_s - loss_c) / abs(loss_c):.1e}), "
          f"largest gradient difference {worst:.1e} of the tensor's largest entry "
          f"({len(grads_c)} trainable tensors)", flush=True)
    return ratio


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="576,2880", help="comma-separated: 576, 2880")
    parser.add_argument("--size", choices=sorted(SIZES), default="256x4")
    parser.add_argument("--pairs", type=int, default=1, help="pairs per step (csr's batch_size; default 1)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per forward (after one warm-up)")
    parser.add_argument("--reference", choices=("tree", "recompute"), default="tree")
    parser.add_argument("--chosen-tokens", type=int, default=CHOSEN_TOKENS)
    parser.add_argument("--rejected-tokens", type=int, default=REJECTED_TOKENS,
                        help="equal to --chosen-tokens: no padding, so the concatenated rows attend with is_causal")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="bfloat16: autocast (weights stay float32, as csr trains)")
    args = parser.parse_args(argv)
    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    unknown = [s for s in shapes if s not in CROPS]
    if unknown:
        raise SystemExit(f"unknown shape(s) {', '.join(unknown)} (known: {', '.join(CROPS)})")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    import warnings

    warnings.filterwarnings("ignore")
    size = SIZES[args.size]
    print(f"bench_dpo_prefix: size {args.size} (text {size.text_hidden} x {size.text_layers} layers), "
          f"device {args.device}, {args.dtype}, {args.threads} thread(s), reference {args.reference}, "
          f"load average {os.getloadavg()[0]:.2f}, torch {torch.__version__}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model_dir = build(root, size)
        for shape in shapes:
            run_shape(shape, args, model_dir, size, root)
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
