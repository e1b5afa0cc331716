"""What csr needs to know about a vision-language architecture, in one object.

An `Adapter` answers, for one family of models (found from the config's
`model_type`, engine/models/__init__.py), every question the rest of csr
would otherwise answer by testing the model type or a module name itself:

- how a prompt is built (the model's chat template; LLaVA-1.5 also the
  LLaVA v1 conversation of the authors' code) and encoded with the image;
- which token ids are image/video placeholders;
- how the positions of a search row continue after the prompt (1-D for
  most; 3-D M-RoPE with the prompt's rope delta for the Qwen-VL family);
- whether the shared-prefix (cascade) attention applies, or the per-row path;
- which modules are the language model (LoRA) and the projector;
- how a training batch carries the processor's outputs besides pixels
  (image_sizes, image_grid_thw, token_type_ids, ...).

The base class is the behaviour of a LLaVA-style decoder with 1-D rotary
positions; a family overrides only what differs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

# Keys of the processor's output that are not model inputs of their own kind:
# the ids and mask are rebuilt with the response; the rest goes to the model as is.
_TEXT_KEYS = ("input_ids", "attention_mask")
_PLACEHOLDER_ATTRIBUTES = ("image_token_index", "image_token_id", "video_token_index", "video_token_id")


@dataclass(frozen=True)
class Adapter:
    """One family of vision-language models, as csr drives it."""

    family: str
    model_types: tuple[str, ...]
    # Hub ids a user would pass to `csr init --model` (docs/models.md).
    hub_ids: tuple[str, ...]
    # Prompt templates the family accepts (`[generate] prompt_template`).
    templates: tuple[str, ...] = ("chat",)
    # Last name components of the text decoder and of the projector modules.
    language_model_names: tuple[str, ...] = ("language_model",)
    projector_names: tuple[str, ...] = ("multi_modal_projector",)
    # Why the shared-prefix attention does not apply, or None when it does.
    per_row_reason: str | None = None
    # What the tests check for this family (tests/test_families.py), for docs/models.md.
    checked: tuple[str, ...] = field(default=())
    notes: str = ""
    # The processor takes one list of images per prompt (Gemma 3, SmolVLM), not one flat list.
    nested_images: bool = False
    # DPO runs the prompt and image once per pair (engine/train/prefix_shared.py): the
    # families whose loss and gradients tests/test_prefix_shared.py checks against the
    # concatenated forward.
    prefix_shared_training: bool = False
    # Evaluation decodes through engine/evaluate/decode.py, tested token for token
    # against greedy `generate` (tests/test_eval_decode.py); other families use `generate`.
    engine_decode: bool = False

    # ------------------------------------------------------------------ prompts

    def build_prompt(self, processor: Any, user_prompt: str, template: str = "chat") -> str:
        """The model's prompt text for one image and one user question."""
        from csr.engine.prompting import PROMPT_TEMPLATES, chat_prompt

        if template not in PROMPT_TEMPLATES:
            raise ValueError(f"unknown prompt template {template!r}; choose one of {', '.join(PROMPT_TEMPLATES)}")
        if template not in self.templates:
            raise ValueError(
                f"prompt template {template!r} is LLaVA-1.5's; a {self.family} model takes "
                f"{' or '.join(repr(t) for t in self.templates)}"
            )
        return chat_prompt(processor, user_prompt, template)

    def encode(self, processor: Any, images: Sequence[Any], user_prompts: Sequence[str], template: str = "chat"):
        """Processor outputs for a batch of (image, prompt), left-padded, with
        the tokenizer's own special tokens as generation has them."""
        return processor(
            text=[self.build_prompt(processor, p, template) for p in user_prompts],
            images=[[image] for image in images] if self.nested_images else list(images),
            padding=True,
            padding_side="left",
            return_tensors="pt",
        )

    # ------------------------------------------------------------- token ids

    def placeholder_ids(self, model_config: Any, processor: Any) -> tuple[int, ...]:
        """The image (and video) placeholder ids: where the processor puts an
        image's features. A response holding one cannot be trained on (the
        model would look for image features there), so the search never
        selects one."""
        found: list[int] = []
        tokenizer = getattr(processor, "tokenizer", None)
        for source in (model_config, processor, tokenizer):
            for name in _PLACEHOLDER_ATTRIBUTES:
                value = getattr(source, name, None) if source is not None else None
                if isinstance(value, int) and value >= 0:
                    found.append(value)
        for name in ("image_token", "video_token"):
            token = getattr(processor, name, None) or getattr(tokenizer, name, None)
            if isinstance(token, str) and tokenizer is not None:
                token_id = tokenizer.convert_tokens_to_ids(token)
                if isinstance(token_id, int) and token_id != getattr(tokenizer, "unk_token_id", None):
                    found.append(token_id)
        return tuple(sorted(set(found)))

    # ------------------------------------------------------------- positions

    def prefix_shift(self, model: Any, inputs: dict[str, Any]) -> int:
        """What the model's position of the token after the prompt adds to its
        index in the sequence, read right after the prompt's own forward pass.
        0 for 1-D positions."""
        return 0

    def row_position_ids(self, positions: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        """The `position_ids` a search forward pass gives the model for rows
        whose tokens sit at sequence indices `positions` (rows, n); `shift`
        (rows,) is each row's prompt's `prefix_shift`."""
        return positions

    def pads_rows(self, model: Any) -> bool:
        """Whether rows of different lengths may share a batch with padding
        between prompt and response: not under sliding-window layers, whose
        window counts cache places (padding included), not positions."""
        text = model.config.get_text_config()
        sliding = "sliding_attention" in (getattr(text, "layer_types", None) or ())
        return not (sliding or getattr(text, "use_sliding_window", False))

    def shares_prefix(self, model: Any, cache: Any) -> bool:
        """Whether the search may hold the prompt's KV once for all rows."""
        from csr.engine.search.cascade_attention import supports_cascade
        from csr.engine.search.kv_cache import is_plain_cache

        return self.per_row_reason is None and is_plain_cache(cache) and supports_cascade(model)

    # ------------------------------------------------------------- training

    def with_responses(
        self, encoded: dict[str, Any], response_ids: torch.Tensor, response_mask: torch.Tensor
    ) -> tuple[dict[str, Any], list[str]]:
        """The prompt batch `encoded` followed by the responses (right-padded):
        input ids and attention mask extended, every other per-token input
        (token_type_ids, mm_token_type_ids) extended with zeros (a response is
        text), the image inputs as the processor gave them. Returns the batch
        and the names of its per-token keys (they move with the ids when the
        batch is flushed left)."""
        width = encoded["input_ids"].shape
        batch = dict(encoded)
        per_token = []
        for key, value in encoded.items():
            if key in _TEXT_KEYS or not isinstance(value, torch.Tensor) or tuple(value.shape) != tuple(width):
                continue
            batch[key] = torch.cat([value, torch.zeros_like(response_ids, dtype=value.dtype)], dim=1)
            per_token.append(key)
        batch["input_ids"] = torch.cat([encoded["input_ids"], response_ids.to(encoded["input_ids"].dtype)], dim=1)
        batch["attention_mask"] = torch.cat([encoded["attention_mask"], response_mask], dim=1)
        return batch, per_token

    def to_model(self, batch: dict[str, Any], device: Any, dtype: Any) -> dict[str, Any]:
        """The batch on the model's device, floating inputs (pixels) in its dtype."""
        out = {}
        for key, value in batch.items():
            if isinstance(value, torch.Tensor):
                value = value.to(device)
                if value.is_floating_point():
                    value = value.to(dtype)
            out[key] = value
        return out


@dataclass(frozen=True)
class MRopeAdapter(Adapter):
    """The Qwen-VL family: multimodal rotary positions (temporal, height,
    width). Image tokens take 2-D grid positions, so the text after the image
    continues from the grid's largest position + 1, not from its sequence
    index: the model keeps the difference as `rope_deltas`. A search row must
    give the same 3-D positions the model's own `generate` gives (text index +
    delta in all three), or its log-probs drift by ~1e-3 from the model's."""

    def prefix_shift(self, model: Any, inputs: dict[str, Any]) -> int:
        deltas = getattr(model.model, "rope_deltas", None)
        if deltas is None:
            raise RuntimeError(f"{self.family}: the prompt's forward pass left no rope_deltas")
        return int(deltas.reshape(-1)[0])

    def row_position_ids(self, positions: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        # As generate gives them: text positions first (the mask's), then the three rotary axes.
        rotary = (positions + shift.to(positions.device)[:, None])[None].expand(3, -1, -1)
        return torch.cat([positions[None], rotary], dim=0)
