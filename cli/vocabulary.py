"""The option vocabulary every command shares: one name per concept, choices
shown as choices, one default device rule (tests/test_cli_vocabulary.py checks
the rules on every command's --help)."""

from __future__ import annotations

from enum import Enum, StrEnum

from csr.engine.errors import CsrError
from csr.engine.rewards import Preset as Preset  # one enum for engine and cli


class SelectBy(StrEnum):
    reward = "reward"
    sentence_reward = "sentence-reward"
    text = "text"


class DType(StrEnum):
    """torch's long names and the short ones TRL and accelerate take (fp16, bf16)."""

    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


DTYPE_LONG_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def dtype_name(choice: DType | None) -> str | None:
    """The long name, the one recorded with an iteration."""
    return None if choice is None else DTYPE_LONG_NAMES.get(choice.value, choice.value)


class ExportFormat(StrEnum):
    llava_json = "llava-json"
    trl_jsonl = "trl-jsonl"
    parquet = "parquet"


class SqlFormat(StrEnum):
    table = "table"
    csv = "csv"
    json = "json"
    parquet = "parquet"


class PairRule(StrEnum):
    """storage/curation.py PAIR_RULES."""

    distinct = "distinct"
    depth_first = "depth-first"


class ReportTo(StrEnum):
    none = "none"
    tensorboard = "tensorboard"
    wandb = "wandb"


def value(choice: Enum | None) -> str | None:
    return None if choice is None else choice.value


MODEL_VERSION_HELP = "Model version (0 is the base model)."
MODEL_VERSIONS_HELP = "Model versions: N, A-B, or a comma-separated list of both (e.g. 0-3)."

DEVICE_HELP = "torch device, e.g. cpu, cuda or cuda:1 (default: cuda when a GPU is present, else cpu)."


def default_device(device: str | None) -> str:
    """The one default rule for commands that run a model: CUDA when present."""
    if device:
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def iteration_range(text: str) -> list[int]:
    """`--iter 2` or `--iter 1-3`."""
    try:
        if "-" in text:
            first, last = (int(part) for part in text.split("-", 1))
        else:
            first = last = int(text)
    except ValueError:
        raise CsrError(f"--iter takes N or A-B (e.g. 1-3), got {text!r}") from None
    if first < 1 or last < first:
        raise CsrError(f"--iter range {text!r} must count up from 1 or more")
    return list(range(first, last + 1))
