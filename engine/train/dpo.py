"""DPO with LoRA on a LLaVA-style model (spec/CSR.md, "DPO").

One call, `train_dpo`, turns pi_{t-1} and the curated pairs of iteration t into
pi_t: TRL's DPOTrainer (sigmoid loss) trains a LoRA adapter on the text
decoder's linear layers and the multimodal projector in full, with the
reference being the same base with the adapter switched off; the adapter is
then merged and the model saved as safetensors with its processor.

DPO trains on token ids, never on re-tokenised text: each example carries the
response token ids the search generated, and the prompt is encoded exactly
as generation encodes it (`prompting.encode_prompts`). The reference log-probs
can come from the tree (`reference="tree"`): the search stored log pi_{N-1}
of every token, so the reference forward pass is not run at all.

Pure engine code: plain objects in, a directory and a `TrainResult` out; the
caller owns the store. Everything that decides the outcome (config, seed, data
order) is explicit so that the same inputs give the same weights on CPU.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from csr.engine.models import adapter_for
from csr.engine.train import prefix_shared
from csr.engine.train.config import TrainConfig
from csr.engine.train.dpo_data import (
    PreferenceExample,
    TokenPreferenceCollator,
    preference_dataset,
    uses_tree_reference,
)
from csr.engine.train.lora import lora_setup, weights_hash
from csr.storage import json_digest

# PEFT and TRL read transformers' deprecated `is_gradient_checkpointing`;
# the warning names nothing a csr user could change.
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)

FINGERPRINT_FILE = "csr_run.json"
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


@dataclass
class TrainResult:
    model_dir: Path
    weights_hash: str
    metrics: list[dict[str, float]]
    lora_config: dict[str, Any]
    train_seconds: float
    global_step: int
    resumed_from_step: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------- training


def _make_trainer_class():
    # Built lazily: importing trl costs seconds, and most csr commands never train.
    from trl import DPOTrainer

    class CSRDPOTrainer(DPOTrainer):
        """DPOTrainer with the released script's two learning rates (LoRA vs
        projector) as optimizer parameter groups; the scheduler scales both."""

        def __init__(self, *args: Any, projector_learning_rate: float, tree_reference: bool,
                     shared_prefix: bool = False, **kwargs: Any) -> None:
            self._projector_lr = projector_learning_rate
            super().__init__(*args, **kwargs)
            # [train] forward: the prompt and image run once per pair (prefix_shared.py).
            self._shared_prefix = shared_prefix
            if shared_prefix:
                prefix_shared.install(self.model)
            # The batches carry ref_chosen_logps/ref_rejected_logps from the
            # tree: TRL then skips the reference forward pass. (TRL refuses its
            # own precomputation for vision data, which is not what happens here.)
            self.precompute_ref_logps = tree_reference

        def create_optimizer(self, model: torch.nn.Module | None = None) -> torch.optim.Optimizer:
            if self.optimizer is None:
                opt_model = self.model if model is None else model
                lora, projector = [], []
                for name, param in opt_model.named_parameters():
                    if param.requires_grad:
                        (projector if ".modules_to_save." in name else lora).append(param)
                groups = [{"params": lora, "lr": self.args.learning_rate, "weight_decay": 0.0}]
                if projector:
                    groups.append({"params": projector, "lr": self._projector_lr, "weight_decay": 0.0})
                optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
                self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
            return self.optimizer

        def training_step(self, *args: Any, **kwargs: Any) -> torch.Tensor:
            # Backward too: gradient checkpointing recomputes the layers there.
            with prefix_shared.holding(self.model, self._shared_prefix):
                return super().training_step(*args, **kwargs)

        def _send_telemetry(self) -> None:
            # Training runs on users' data, often offline: never phone home.
            pass

    return CSRDPOTrainer


# Options that change how often things are written, not what is trained:
# changing them between a crash and the resume is harmless.
_BOOKKEEPING_OPTIONS = ("logging_steps", "save_steps", "save_total_limit", "report_to",
                        # decides which pairs reach train_dpo; the fingerprint covers those pairs
                        "unencodable",
                        # the same loss and gradients within float tolerance either way (prefix_shared.py);
                        # also keeps checkpoints written before the setting existed resumable
                        "forward")


def _run_fingerprint(base_model_path: str, examples: Sequence[PreferenceExample], config: TrainConfig) -> str:
    settings = {k: v for k, v in config.to_dict().items() if k not in _BOOKKEEPING_OPTIONS}
    payload = {
        "base_model_path": str(base_model_path),
        "config": settings,
        "examples": [dataclasses.asdict(e) for e in examples],
    }
    return json_digest(payload)


def last_checkpoint(checkpoint_dir: Path) -> Path | None:
    """The newest complete Trainer checkpoint. Trainer writes trainer_state.json
    last and not atomically, so a checkpoint without it was cut off mid-write."""
    if not checkpoint_dir.is_dir():
        return None
    found = sorted(
        (int(m.group(1)), p)
        for p in checkpoint_dir.iterdir()
        if p.is_dir() and (m := _CHECKPOINT_RE.match(p.name))
    )
    for _, path in reversed(found):
        if (path / "trainer_state.json").is_file():
            return path
    return None


def _resume_point(checkpoint_dir: Path, fingerprint: str) -> Path | None:
    """The checkpoint to resume from, after checking it belongs to this very run
    (same base, pairs and config): resuming another run would silently train
    a mixture of the two."""
    resume = last_checkpoint(checkpoint_dir)
    if resume is not None:
        marker = checkpoint_dir / FINGERPRINT_FILE
        recorded = json.loads(marker.read_text()).get("fingerprint") if marker.is_file() else None
        if recorded != fingerprint:
            raise ValueError(
                f"{checkpoint_dir} holds checkpoints of a different training run "
                "(other base model, pairs or config); remove it or use another checkpoint directory"
            )
    return resume


def _prepare_checkpoint_dir(checkpoint_dir: Path, fingerprint: str, resume: Path | None) -> None:
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    (checkpoint_dir / FINGERPRINT_FILE).write_text(json.dumps({"fingerprint": fingerprint}) + "\n")
    # Half-written checkpoints newer than the resume point would be picked over
    # it by the checkpoint rotation; they hold nothing usable.
    resume_step = _step_of(resume) if resume else -1
    for path in checkpoint_dir.iterdir():
        m = _CHECKPOINT_RE.match(path.name)
        if m and path.is_dir() and int(m.group(1)) > resume_step:
            shutil.rmtree(path)


def _step_of(checkpoint: Path) -> int:
    return int(_CHECKPOINT_RE.match(checkpoint.name).group(1))


def _use_bf16(config: TrainConfig, device: str | None) -> bool:
    if config.bf16 is not None:
        return config.bf16
    if device is not None and not device.startswith("cuda"):
        return False
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


METRIC_KEYS = (
    "loss", "learning_rate", "grad_norm", "rewards/chosen", "rewards/rejected",
    "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected",
)


def _step_metrics(log_history: list[dict[str, Any]]) -> list[dict[str, float]]:
    rows = []
    for entry in log_history:
        if "loss" in entry and "step" in entry:
            row = {"step": int(entry["step"]), "epoch": float(entry.get("epoch", 0.0))}
            row.update({k: float(entry[k]) for k in METRIC_KEYS if k in entry})
            rows.append(row)
    return rows


def _dpo_args(config: TrainConfig, checkpoint_dir: Path, bf16: bool, device: str | None) -> Any:
    from trl import DPOConfig

    # transformers 5.x renamed gradient checkpointing and warns on the old name.
    checkpointing = ("activation_checkpointing" if "activation_checkpointing" in DPOConfig.__dataclass_fields__
                     else "gradient_checkpointing")
    return DPOConfig(
        output_dir=str(checkpoint_dir),
        beta=config.beta,
        loss_type=["sigmoid", "sft"] if config.sft_weight else ["sigmoid"],
        loss_weights=[1.0, config.sft_weight] if config.sft_weight else None,
        learning_rate=config.learning_rate,
        lr_scheduler_type=config.lr_scheduler,
        # transformers 5 folded warmup_ratio into warmup_steps: a float < 1 is a ratio.
        warmup_steps=config.warmup_ratio,
        num_train_epochs=config.epochs,
        per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum,
        weight_decay=0.0,
        max_length=None,  # pairs that do not fit are filtered, never cut (TrainConfig.max_response_tokens)
        remove_unused_columns=False,  # the collator reads the id columns
        seed=config.seed,
        data_seed=config.seed,
        bf16=bf16,
        fp16=False,
        use_cpu=device == "cpu",
        **{checkpointing: config.gradient_checkpointing},
        # TRL zeroes every dropout by default, which would silently drop the
        # configured lora_dropout; LLaVA's own dropouts are 0 anyway.
        disable_dropout=False,
        logging_steps=config.logging_steps,
        save_strategy="steps",
        save_steps=config.save_steps,
        save_total_limit=config.save_total_limit,
        save_only_model=False,  # optimizer, scheduler and RNG states make resuming exact
        dataloader_num_workers=0,
        report_to=config.report_to,
        disable_tqdm=True,
        push_to_hub=False,
    )


def make_trainer(model: Any, processor: Any, examples: Sequence[PreferenceExample], config: TrainConfig, lora: Any,
                 checkpoint_dir: Path, bf16: bool, device: str | None, callbacks: Sequence[Any] = ()):
    """TRL's trainer over `examples` as `train_dpo` runs it: (trainer, whether
    the reference comes from the tree, whether the forward is prefix-shared)."""
    tree_reference = uses_tree_reference(examples, config)
    shared_prefix = prefix_shared.resolve_forward(config.forward, model)
    tokenizer = processor.tokenizer
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    collator = (prefix_shared.PrefixSharedCollator(processor, pad_id) if shared_prefix
                else TokenPreferenceCollator(processor, pad_id, adapter_for(model)))
    trainer = _make_trainer_class()(
        model=model,
        args=_dpo_args(config, checkpoint_dir, bf16, device),
        train_dataset=preference_dataset(examples, tree_reference),
        data_collator=collator,
        processing_class=processor,
        peft_config=lora,
        callbacks=list(callbacks),
        projector_learning_rate=config.projector_learning_rate,
        tree_reference=tree_reference,
        shared_prefix=shared_prefix,
    )
    return trainer, tree_reference, shared_prefix


def train_dpo(
    base_model_path: str,
    examples: list[PreferenceExample],
    output_dir: Path,
    checkpoint_dir: Path,
    config: TrainConfig,
    device: str | None = None,
    callbacks: Sequence[Any] = (),
) -> TrainResult:
    """Train pi_t from pi_{t-1} = `base_model_path` (also the DPO reference) on
    `examples`, merge the adapter and save the model to `output_dir`.

    Resumes from the newest complete checkpoint in `checkpoint_dir` written by
    the same run. `device=None` lets Trainer/accelerate place the model (the
    only correct choice for GPUs under `accelerate launch`); "cpu" forces the
    CPU (also what makes several CPU processes under torchrun/accelerate
    distributed); "cuda:N" selects one GPU in a single-process run. `callbacks` are
    transformers TrainerCallbacks (progress bars, interruption).
    `train_seconds` counts this call's training only, not earlier attempts.
    """
    from transformers import AutoModelForImageTextToText, AutoProcessor, PrinterCallback

    if not examples:
        raise ValueError("no preference pairs to train on")
    missing = [e.image_path for e in examples if not Path(e.image_path).is_file()]
    if missing:
        raise FileNotFoundError(f"image not found: {missing[0]} ({len(missing)} missing in all)")
    output_dir, checkpoint_dir = Path(output_dir), Path(checkpoint_dir)
    fingerprint = _run_fingerprint(base_model_path, examples, config)
    resume = _resume_point(checkpoint_dir, fingerprint)
    if device is not None and device.startswith("cuda:"):
        torch.cuda.set_device(torch.device(device))
    bf16 = _use_bf16(config, device)

    processor = AutoProcessor.from_pretrained(base_model_path)
    # fp32 master weights even for bf16 runs: autocast computes in bf16, while
    # the merge adds the (tiny) LoRA delta at full precision.
    model = AutoModelForImageTextToText.from_pretrained(base_model_path, dtype=torch.float32)
    # Training switches the KV cache off in the config; the saved model must
    # generate like its base.
    use_cache = model.config.get_text_config().use_cache
    lora, lora_record = lora_setup(model, config)
    too_long = [e for e in examples if max(len(e.chosen_ids), len(e.rejected_ids)) > config.max_response_tokens]
    if too_long:
        raise ValueError(
            f"{len(too_long)} pair(s) have a response longer than max_response_tokens "
            f"({config.max_response_tokens}); filter them first (training never cuts a response)"
        )
    trainer, tree_reference, shared_prefix = make_trainer(
        model, processor, examples, config, lora, checkpoint_dir, bf16, device, callbacks)
    # The engine is silent; the caller adds progress through `callbacks`.
    trainer.remove_callback(PrinterCallback)

    accelerator = trainer.accelerator
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and accelerator.num_processes != launched:
        # Each rank would train alone and race the others writing output_dir.
        raise RuntimeError(
            f"launched as {launched} processes but training is not distributed "
            f"(accelerate runs {accelerator.num_processes}); for several CPU processes pass device='cpu'"
        )
    if accelerator.is_main_process:
        _prepare_checkpoint_dir(checkpoint_dir, fingerprint, resume)
    accelerator.wait_for_everyone()

    started = time.perf_counter()
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    train_seconds = time.perf_counter() - started

    merged = accelerator.unwrap_model(trainer.model).merge_and_unload()
    merged = merged.to(getattr(torch, config.save_dtype))
    merged.config.get_text_config().use_cache = use_cache
    if accelerator.is_main_process:
        _save_atomically(merged, processor, output_dir)
    accelerator.wait_for_everyone()

    return TrainResult(
        model_dir=output_dir,
        weights_hash=weights_hash(output_dir),
        metrics=_step_metrics(trainer.state.log_history),
        lora_config=lora_record,
        train_seconds=train_seconds,
        global_step=int(trainer.state.global_step),
        resumed_from_step=_step_of(resume) if resume else None,
        extra={"bf16": bf16, "num_pairs": len(examples), "reference": "tree" if tree_reference else "recompute",
               "forward": "prefix-shared" if shared_prefix else "concatenated"},
    )


def _save_atomically(model: Any, processor: Any, output_dir: Path) -> None:
    """Write next to the target and rename, so a crash never leaves a directory
    that looks like a finished model."""
    tmp = output_dir.parent / f".{output_dir.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp, safe_serialization=True)
    processor.save_pretrained(tmp)
    if output_dir.exists():
        shutil.rmtree(output_dir)
    os.replace(tmp, output_dir)
