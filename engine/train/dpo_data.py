"""DPO's data: pairs as token ids, batched exactly as generation encoded them,
and the forward passes that check what DPO did.

DPO trains on token ids, never on re-tokenised text: each example carries the
response token ids the search generated, and the prompt is encoded exactly as
generation encodes it (`prompting.encode_prompts`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from csr.engine.train.config import TrainConfig


@dataclass
class PreferenceExample:
    """One pair as DPO sees it: the user prompt (encoded as generation encodes
    it), and the response token ids exactly as generated (EOS included where
    the model ended the response). The reference log-probs are the sums of the
    search's stored token log-probs under pi_{N-1}, when known."""

    image_path: str
    prompt: str
    chosen_ids: list[int]
    rejected_ids: list[int]
    chosen_ref_logp: float | None = None
    rejected_ref_logp: float | None = None
    # The template the iteration searched with (`[generate] prompt_template`).
    prompt_template: str = "chat"


def completion_ids(tokenizer: Any, text: str) -> list[int]:
    """Token ids for a response known only as text (pairs rebuilt from stores
    made before token ids were kept, hand-made pairs): the text, then EOS."""
    ids = tokenizer(text, add_special_tokens=False).input_ids
    return [*ids, tokenizer.eos_token_id]


def batch_images_and_template(examples: list[dict[str, Any]]) -> tuple[list, str]:
    """The RGB images of a batch of pairs and its one prompt template."""
    from PIL import Image

    images = []
    for e in examples:
        with Image.open(e["images"][0]) as image:
            images.append(image.convert("RGB"))
    templates = {e.get("prompt_template", "chat") for e in examples}
    if len(templates) > 1:
        raise ValueError(f"one batch holds pairs of several prompt templates: {sorted(templates)}")
    return images, templates.pop()


@dataclass
class TokenPreferenceCollator:
    """Batches of pre-tokenised pairs: chosen rows then rejected rows, each the
    prompt (image expanded by the processor, left-padded) followed by the
    response ids (right-padded), then flushed left as TRL's own collators do.
    Nothing is truncated: over-long pairs are filtered before training."""

    processor: Any
    pad_token_id: int
    # The model's family (engine/models): how prompts are encoded and what the batch carries.
    adapter: Any = None

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        from trl.trainer.utils import flush_left

        from csr.engine.models import LLAVA

        adapter = self.adapter or LLAVA
        images, template = batch_images_and_template(examples)
        prompts = [e["prompt"] for e in examples] * 2
        encoded = adapter.encode(self.processor, images * 2, prompts, template)
        responses = [e["chosen_ids"] for e in examples] + [e["rejected_ids"] for e in examples]
        width = max(len(r) for r in responses)
        response_ids = torch.full((len(responses), width), self.pad_token_id, dtype=torch.long)
        response_mask = torch.zeros((len(responses), width), dtype=torch.long)
        for row, ids in enumerate(responses):
            response_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            response_mask[row, : len(ids)] = 1
        # The processor's other per-token inputs (token_type_ids, mm_token_type_ids)
        # are extended and flushed with the ids; the image inputs ride along as given.
        batch, per_token = adapter.with_responses(encoded, response_ids, response_mask)
        completion_mask = torch.cat([torch.zeros_like(encoded["attention_mask"]), response_mask], dim=1)
        flushed = flush_left(
            batch["attention_mask"], batch["input_ids"], completion_mask, *(batch[k] for k in per_token)
        )
        attention_mask, input_ids, completion_mask, *rest = flushed
        batch.update(input_ids=input_ids, attention_mask=attention_mask, completion_mask=completion_mask)
        batch.update(zip(per_token, rest, strict=True))
        if "ref_chosen_logps" in examples[0]:
            batch["ref_chosen_logps"] = torch.tensor([e["ref_chosen_logps"] for e in examples])
            batch["ref_rejected_logps"] = torch.tensor([e["ref_rejected_logps"] for e in examples])
        return batch


def unencodable_reason(example: PreferenceExample, processor: Any, placeholder_ids: Sequence[int],
                       vocab_size: int, adapter: Any = None) -> str | None:
    """Why the model cannot train on `example` as stored, or None. A response
    holding an image placeholder id makes the model look for image features
    that are not there ("Image features and image tokens do not match"); the
    search masks those ids, but trees searched before it did, or by another
    tool, may hold them."""
    from PIL import Image

    from csr.engine.models import LLAVA

    adapter = adapter or LLAVA
    placeholders = set(placeholder_ids)
    for side, ids in (("chosen", example.chosen_ids), ("rejected", example.rejected_ids)):
        held = sorted(placeholders.intersection(ids))
        if held:
            return f"the {side} response holds the image placeholder id {held[0]}"
        outside = [i for i in ids if not 0 <= i < vocab_size]
        if outside:
            return f"the {side} response holds id {outside[0]}, outside the vocabulary ({vocab_size} ids)"
    try:
        with Image.open(example.image_path) as image:
            adapter.encode(processor, [image.convert("RGB")], [example.prompt], example.prompt_template)
    except Exception as exc:  # noqa: BLE001  (any processor failure makes the pair unusable)
        return f"the processor cannot encode its image and prompt: {type(exc).__name__}: {exc}"
    return None


def find_unencodable(examples: Sequence[PreferenceExample], model_path: str | Path) -> dict[int, str]:
    """{index: reason} of each example the model at `model_path` cannot train on."""
    from transformers import AutoConfig, AutoProcessor

    from csr.engine.models import adapter_for

    processor = AutoProcessor.from_pretrained(str(model_path))
    model_config = AutoConfig.from_pretrained(str(model_path))
    adapter = adapter_for(model_config)
    vocab_size = int(model_config.get_text_config().vocab_size)
    placeholders = adapter.placeholder_ids(model_config, processor)
    found = {}
    for index, example in enumerate(examples):
        reason = unencodable_reason(example, processor, placeholders, vocab_size, adapter)
        if reason is not None:
            found[index] = reason
    return found


def uses_tree_reference(examples: Sequence[PreferenceExample], config: TrainConfig) -> bool:
    """The tree's log-probs serve as the reference only when every pair has them."""
    return config.reference != "recompute" and all(
        e.chosen_ref_logp is not None and e.rejected_ref_logp is not None for e in examples
    )


def preference_dataset(examples: Sequence[PreferenceExample], tree_reference: bool):
    """The pairs as a dataset of ids. The `images` column (paths, loaded by the
    collator) makes TRL treat it as vision data and leave it untouched."""
    from datasets import Dataset

    columns: dict[str, list] = {
        "images": [[str(e.image_path)] for e in examples],
        "prompt": [e.prompt for e in examples],
        "chosen_ids": [list(e.chosen_ids) for e in examples],
        "rejected_ids": [list(e.rejected_ids) for e in examples],
        "prompt_template": [e.prompt_template for e in examples],
    }
    if tree_reference:
        columns["ref_chosen_logps"] = [float(e.chosen_ref_logp) for e in examples]
        columns["ref_rejected_logps"] = [float(e.rejected_ref_logp) for e in examples]
    return Dataset.from_dict(columns)


# ----------------------------------------------------------------- sanity check


@torch.no_grad()
def completion_logprob(
    model: Any, processor: Any, image: Any, prompt: str, response_ids: Sequence[int], template: str = "chat"
) -> float:
    """Summed log-probability of the response ids after image + prompt, the
    prompt encoded as generation and training encode it."""
    from csr.engine.models import adapter_for

    adapter = adapter_for(model)
    device = next(model.parameters()).device
    encoded = adapter.encode(processor, [image], [prompt], template)
    response = torch.tensor([list(response_ids)], dtype=torch.long)
    batch, _ = adapter.with_responses(encoded, response, torch.ones_like(response))
    batch = adapter.to_model(batch, device, model.dtype)
    input_ids = batch["input_ids"]
    logits = model(**batch).logits.float()
    start = encoded["input_ids"].shape[1]
    # Position i predicts token i + 1.
    logprobs = torch.log_softmax(logits[0, start - 1 : -1], dim=-1)
    targets = input_ids[0, start:]
    return float(logprobs.gather(-1, targets[:, None]).sum().double())


def implicit_reward_margins(
    policy_path: str | Path,
    reference_path: str | Path,
    examples: Sequence[PreferenceExample],
    beta: float,
    device: str | None = None,
) -> list[float]:
    """beta * ((log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l))) per
    pair, from plain forward passes: an independent check of what DPO did."""
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    processor = AutoProcessor.from_pretrained(str(policy_path))
    models = [
        AutoModelForImageTextToText.from_pretrained(str(path), dtype=torch.float32).to(device).eval()
        for path in (policy_path, reference_path)
    ]
    margins = []
    for ex in examples:
        image = Image.open(ex.image_path).convert("RGB")
        (pol_w, pol_l), (ref_w, ref_l) = (
            [completion_logprob(m, processor, image, ex.prompt, y, ex.prompt_template)
             for y in (ex.chosen_ids, ex.rejected_ids)]
            for m in models
        )
        margins.append(beta * ((pol_w - ref_w) - (pol_l - ref_l)))
    return margins
