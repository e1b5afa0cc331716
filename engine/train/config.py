"""Every setting of DPO with LoRA: the `[train]` table of csr.toml.

Kept apart from the recipe (`dpo`) so that reading csr.toml does not import
torch. A training run records `TrainConfig.to_dict()`; its checkpoints carry
a fingerprint over the same dict.
"""

from __future__ import annotations

from typing import ClassVar, Literal, get_args

from pydantic import Field, field_validator

from csr.engine.errors import SettingsError
from csr.engine.settings_table import Number, SettingsTable

LrScheduler = Literal["cosine", "linear", "constant", "constant_with_warmup"]
TooLong = Literal["skip", "refuse"]
Unencodable = Literal["skip", "refuse"]
ReportTo = Literal["none", "tensorboard", "wandb"]
Reference = Literal["auto", "tree", "recompute"]
SaveDtype = Literal["float32", "bfloat16", "float16"]
Forward = Literal["auto", "prefix-shared", "concatenated"]
LR_SCHEDULERS: tuple[str, ...] = get_args(LrScheduler)
TOO_LONG: tuple[str, ...] = get_args(TooLong)
UNENCODABLE: tuple[str, ...] = get_args(Unencodable)
REPORT_TO: tuple[str, ...] = get_args(ReportTo)
REFERENCES: tuple[str, ...] = get_args(Reference)
SAVE_DTYPES: tuple[str, ...] = get_args(SaveDtype)
FORWARDS: tuple[str, ...] = get_args(Forward)


class TrainConfigError(SettingsError):
    """A training option the user got wrong (unknown key, bad value)."""


class TrainConfig(SettingsTable):
    noun: ClassVar[str] = "training option"
    error: ClassVar[type[SettingsError]] = TrainConfigError

    beta: Number = Field(0.1, gt=0)
    # Weight of an added negative log-likelihood term on the chosen response
    # (TRL's "sft" loss next to "sigmoid", as in RPO). 0 is the paper's pure DPO.
    # DPO on pairs that differ in a word or two can lower the chosen response's
    # likelihood too; the NLL term holds it up (docs/demo-results.md).
    sft_weight: Number = Field(0.0, ge=0)
    lora_r: int = Field(128, gt=0)
    lora_alpha: int = Field(256, gt=0)
    lora_dropout: Number = Field(0.05, ge=0, lt=1)
    # "language_model": the seven decoder projections; or a comma-separated list
    # of layer names inside the language model, e.g. "q_proj,v_proj".
    lora_target: str = "language_model"
    learning_rate: Number = Field(1e-7, gt=0)
    # 0 freezes the projector; otherwise it trains in full at this rate.
    projector_learning_rate: Number = Field(2e-5, ge=0)
    lr_scheduler: LrScheduler = "cosine"
    warmup_ratio: Number = Field(0.03, ge=0, lt=1)
    epochs: int = Field(1, gt=0)
    batch_size: int = Field(1, gt=0)
    grad_accum: int = Field(1, gt=0)
    seed: int = 42
    # The longest response DPO trains on, in response tokens; the image and the
    # prompt come on top, whatever the processor expands them to. A pair with a
    # longer response is never cut: it is skipped and counted, or refused.
    max_response_tokens: int = Field(1024, gt=0)
    too_long: TooLong = "skip"
    # A pair the model cannot be trained on as stored (a response holding an
    # image placeholder id, an image the processor cannot encode): skipped,
    # named and counted, or the whole run refused. One pair never fails a run.
    unencodable: Unencodable = "skip"
    # Where log pi_{N-1} of chosen and rejected comes from: the search's stored
    # token log-probs ("tree", no reference forward pass) or a forward pass of
    # the adapter-free model ("recompute"). "auto": the tree when the iteration
    # recorded float32 as its dtype (where the two agree within 1e-4), else
    # recompute (an iteration with no recorded dtype included).
    reference: Reference = "auto"
    # TRL's own log reporting, next to the metrics csr stores with the run
    # (tensorboard writes under the run's checkpoint directory, runs/).
    report_to: ReportTo = "none"
    logging_steps: int = Field(1, gt=0)
    save_steps: int = Field(50, gt=0)
    # Two, not one: a crash while writing the newest checkpoint leaves the one
    # before it intact to resume from.
    save_total_limit: int = Field(2, gt=0)
    bf16: bool | None = None  # None: on when CUDA supports bf16, off elsewhere
    gradient_checkpointing: bool = True
    # How a pair goes through the model: "prefix-shared" runs the prompt and its
    # image once, with chosen and rejected both attending to it (arXiv
    # 2410.20305; engine/train/prefix_shared.py); "concatenated" is TRL's two
    # rows, each with the whole prompt. Equal loss and gradients within float
    # tolerance. "auto": prefix-shared where the architecture supports it
    # (LLaVA, LLaVA-NeXT).
    forward: Forward = "auto"
    # LoRA updates at lr 1e-7 are below 16-bit rounding of many weights, so the
    # merged model keeps full precision unless asked otherwise.
    save_dtype: SaveDtype = "float32"

    @field_validator("lora_target")
    @classmethod
    def _names_a_layer(cls, value: str) -> str:
        if not any(name.strip() for name in value.split(",")):
            raise ValueError("training option lora_target is empty")
        return value
