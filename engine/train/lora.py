"""LoRA on a vision-language model: which layers it adapts (the model's
adapter, engine/models, names its language model and projector), its PEFT
config, and the weights hash every saved model version carries."""

from __future__ import annotations

import contextlib
import hashlib
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from csr.engine.train.config import TrainConfig

# The seven projections of a Llama/Mistral/Vicuna/Qwen decoder layer: what the
# released script's LoRA targets inside the language model.
DECODER_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# ------------------------------------------------------------------- model surgery


def _find_module(model: torch.nn.Module, names: Sequence[str]) -> str | None:
    """Full name of the first submodule whose last name component is in `names`
    (shortest path wins, so a nested copy never shadows the real one)."""
    found = [n for n, _ in model.named_modules() if n.rsplit(".", 1)[-1] in names]
    return min(found, key=lambda n: n.count(".")) if found else None


def _lora_leaf_names(lora_target: str) -> tuple[str, ...]:
    if lora_target == "language_model":
        return DECODER_PROJECTIONS
    return tuple(p.strip() for p in lora_target.split(",") if p.strip())


def resolve_lora_targets(model: torch.nn.Module, lora_target: str) -> tuple[str, list[str]]:
    """A PEFT target regex over the text decoder's linear layers, and the module
    names it matches. The vision tower shares layer names with the decoder
    (q_proj...), so the match is anchored at the language model's own path."""
    from csr.engine.models import adapter_for

    names = adapter_for(model).language_model_names
    lm_name = _find_module(model, names)
    if lm_name is None:
        raise ValueError(
            f"cannot find the language model in {type(model).__name__}: no submodule named {' or '.join(names)}"
        )
    leaves = _lora_leaf_names(lora_target)
    pattern = rf"{re.escape(lm_name)}\..*\.({'|'.join(map(re.escape, leaves))})"
    matched = [
        n for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and re.fullmatch(pattern, n)
    ]
    if not matched:
        raise ValueError(
            f"lora_target {lora_target!r} matches no linear layer under {lm_name} "
            f"of {type(model).__name__}"
        )
    return pattern, matched


# ------------------------------------------------------------------------ hashing


def weights_hash(model_dir: Path | str) -> str:
    """sha256 over every tensor of the directory's safetensors files, in name
    order, with dtype and shape: independent of sharding and header layout."""
    from safetensors import safe_open

    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors files in {model_dir}")
    digest = hashlib.sha256()
    with contextlib.ExitStack() as stack:
        handles = [stack.enter_context(safe_open(str(p), framework="pt")) for p in files]
        where = {key: handle for handle in handles for key in handle.keys()}
        for key in sorted(where):
            tensor = where[key].get_tensor(key).contiguous()
            digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def lora_setup(model: torch.nn.Module, config: TrainConfig) -> tuple[Any, dict[str, Any]]:
    """The PEFT LoraConfig and its record for the model version row."""
    from peft import LoraConfig

    target_regex, targeted = resolve_lora_targets(model, config.lora_target)
    modules_to_save: list[str] = []
    if config.projector_learning_rate > 0:
        from csr.engine.models import adapter_for

        projector = _find_module(model, adapter_for(model).projector_names)
        if projector is None:
            raise ValueError(f"cannot find the multimodal projector in {type(model).__name__}")
        modules_to_save = [projector.rsplit(".", 1)[-1]]
    record = {
        "r": config.lora_r,
        "lora_alpha": config.lora_alpha,
        "lora_dropout": config.lora_dropout,
        "target_modules": target_regex,
        "targeted_module_count": len(targeted),
        "modules_to_save": modules_to_save,
        "bias": "none",
    }
    lora = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=target_regex,
        # A trainable copy of the projector; with the adapter disabled the
        # original computes the reference, as pi_{t-1} requires.
        modules_to_save=modules_to_save or None,
        bias="none",
    )
    return lora, record
