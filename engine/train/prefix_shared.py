"""DPO's forward with the prompt and image run once per pair (prefix sharing,
arXiv 2410.20305).

TRL's concatenated forward runs chosen and rejected as two rows, each with
the whole prompt and its image tokens (576 for LLaVA-1.5, up to 2,928 for
LLaVA-NeXT) in front of a response of about a hundred tokens: most of a
step recomputes one prefix twice, the vision tower included. Here a pair is
one row, [prompt | chosen | rejected]:

- the prompt attends to itself causally (its padding sits at its end, so
  causality alone hides it from the real tokens);
- chosen attends to the prompt and to itself causally; rejected to the
  prompt and to itself, never to chosen; both take position ids that
  continue the prompt, as in their own rows of the concatenated forward;
- the last prompt token's hidden state predicts the first token of both
  responses; every other response token is predicted by the one before it.

Attention runs in two parts per layer, through transformers' attention
interface (`ATTN_NAME`): the prompt's queries with `is_causal` (the kernel
skips the upper triangle), and the responses' queries against every key
with a small (responses x row) mask. Only response positions go through the
LM head.

Nothing in TRL changes: the batch carries the concatenated forward's
`input_ids` / `attention_mask` / `completion_mask` next to the shared layout
(`LAYOUT_KEY`), and the model's forward, wrapped by `install`, answers TRL's
`model(..., labels=..., fused_lm_head=True)` with per-token fields laid out
as the concatenated forward lays them out. TRL's loss, its metrics and its
reference pass (adapter off, the `reference = "recompute"` path) read them
unchanged. Losses and gradients equal the concatenated forward's within
float tolerance (tests/test_prefix_shared.py).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from csr.engine.models.attention import attention_implementation
from csr.engine.train.config import FORWARDS

ATTN_NAME = "csr_prefix_shared"
MASK_KWARG = "csr_prefix_shared_mask"
LAYOUT_KEY = "csr_prefix_shared"
# Architectures whose forward was checked against the concatenated one
# (tests/test_prefix_shared.py): image features scattered into placeholder
# tokens, 1-D rotary positions. (Qwen2-VL's 3-D positions, for one, would need
# their own layout.)
def prefix_shared_families() -> tuple[str, ...]:
    from csr.engine.models import ADAPTERS

    return tuple(a.family for a in ADAPTERS if a.prefix_shared_training)


# ------------------------------------------------------------------------ layout


def concatenated_fields(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, responses: list[list[int]],
                        pad_token_id: int) -> dict[str, torch.Tensor]:
    """The concatenated forward's rows (chosen rows then rejected rows): prompt,
    then response, flushed left; what TRL's loss and metrics index by.
    `prompt_ids`/`prompt_mask` hold each prompt once per row."""
    from trl.trainer.utils import flush_left

    width = max(len(r) for r in responses)
    response_ids = torch.full((len(responses), width), pad_token_id, dtype=torch.long)
    response_mask = torch.zeros((len(responses), width), dtype=torch.long)
    for row, ids in enumerate(responses):
        response_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        response_mask[row, : len(ids)] = 1
    input_ids = torch.cat([prompt_ids, response_ids], dim=1)
    attention_mask = torch.cat([prompt_mask, response_mask], dim=1)
    completion_mask = torch.cat([torch.zeros_like(prompt_mask), response_mask], dim=1)
    attention_mask, input_ids, completion_mask = flush_left(attention_mask, input_ids, completion_mask)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask}


def shared_layout(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, chosen: list[list[int]],
                  rejected: list[list[int]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """One row per pair: [prompt (right-padded) | chosen (padded) | rejected (padded)].

    Returns the row's `input_ids` and `position_ids`, the responses' attention
    mask (pairs, responses' columns, row) and, per response token, where its
    prediction is read (`src_row`, `src_col`), its id (`labels`) and its place
    in the concatenated forward's per-token outputs (`out_row`, `out_col`)."""
    pairs = len(chosen)
    lengths = prompt_mask.sum(dim=1)
    if int(lengths.min()) < 1:
        raise ValueError("a pair with an empty prompt has no token to predict its response from")
    width = prompt_ids.shape[1]
    wc, wr = max(len(c) for c in chosen), max(len(r) for r in rejected)
    if min(min(len(c) for c in chosen), min(len(r) for r in rejected)) < 1:
        raise ValueError("a pair with an empty response")
    suffix = wc + wr
    total = width + suffix
    ids = torch.full((pairs, total), pad_token_id, dtype=torch.long)
    for row in range(pairs):
        prompt = prompt_ids[row][prompt_mask[row].bool()]
        ids[row, : prompt.numel()] = prompt
        ids[row, width : width + len(chosen[row])] = torch.tensor(chosen[row], dtype=torch.long)
        ids[row, width + wc : width + wc + len(rejected[row])] = torch.tensor(rejected[row], dtype=torch.long)

    slot = torch.arange(suffix)
    is_chosen = slot < wc
    step = torch.where(is_chosen, slot, slot - wc)  # index of the token within its response
    start = torch.where(is_chosen, width, width + wc)  # the response's first column
    positions = torch.cat([torch.arange(width).expand(pairs, -1), lengths[:, None] + step[None, :]], dim=1)

    c_len = torch.tensor([len(c) for c in chosen])
    r_len = torch.tensor([len(r) for r in rejected])
    real = torch.where(is_chosen[None, :], step[None, :] < c_len[:, None], step[None, :] < r_len[:, None])
    column = torch.arange(total)
    own = (column[None, :] >= start[:, None]) & (column[None, :] <= (start + step)[:, None])  # (suffix, total)
    seen_prompt = column[None, :] < lengths[:, None]  # (pairs, total)
    mask = own[None] | seen_prompt[:, None, :]
    # A padding slot attends to itself alone: a row that sees no key would give
    # NaN, whose gradient would reach the keys through the softmax.
    mask = torch.where(real[:, :, None], mask, (column[None, :] == (width + slot)[:, None])[None])

    rows, slots = real.nonzero(as_tuple=True)
    k = step[slots]
    src_col = torch.where(k == 0, lengths[rows] - 1, start[slots] + k - 1)
    return {
        "input_ids": ids,
        "position_ids": positions,
        "suffix_mask": mask,
        "src_row": rows,
        "src_col": src_col,
        "labels": ids[rows, start[slots] + k],
        "out_row": torch.where(is_chosen[slots], rows, rows + pairs),
        "out_col": lengths[rows] + k - 1,
    }


@dataclass
class PrefixSharedCollator:
    """`TokenPreferenceCollator`'s batch (the same concatenated fields, so TRL's
    loss and metrics see what they always see) with each prompt and image
    encoded once and the shared layout under `LAYOUT_KEY`."""

    processor: Any
    pad_token_id: int

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        from csr.engine.prompting import encode_prompts
        from csr.engine.train.dpo_data import batch_images_and_template

        images, template = batch_images_and_template(examples)
        encoded = encode_prompts(self.processor, images, [e["prompt"] for e in examples], template)
        batch = pair_batch(encoded, [e["chosen_ids"] for e in examples], [e["rejected_ids"] for e in examples],
                           self.pad_token_id)
        if "ref_chosen_logps" in examples[0]:
            batch["ref_chosen_logps"] = torch.tensor([e["ref_chosen_logps"] for e in examples])
            batch["ref_rejected_logps"] = torch.tensor([e["ref_rejected_logps"] for e in examples])
        return batch


def pair_batch(encoded: Any, chosen: list[list[int]], rejected: list[list[int]], pad_token_id: int) -> dict[str, Any]:
    """A prefix-shared batch from prompts encoded once per pair (the processor's
    output, left-padded: input_ids, attention_mask, pixel_values, ...)."""
    prompt_ids, prompt_mask = encoded["input_ids"], encoded["attention_mask"]
    batch = {k: v for k, v in encoded.items() if k not in ("input_ids", "attention_mask")}
    batch.update(concatenated_fields(prompt_ids.repeat(2, 1), prompt_mask.repeat(2, 1), [*chosen, *rejected],
                                     pad_token_id))
    batch[LAYOUT_KEY] = shared_layout(prompt_ids, prompt_mask, chosen, rejected, pad_token_id)
    return batch


def concatenated_batch(batch: dict[str, Any]) -> dict[str, Any]:
    """The concatenated forward's batch for the same pairs: every image input
    twice, no layout (what `TokenPreferenceCollator` gives; the bench compares the two)."""
    out = {k: v for k, v in batch.items() if k != LAYOUT_KEY}
    for key in ("pixel_values", "image_sizes"):
        if key in batch:
            out[key] = batch[key].repeat(2, *([1] * (batch[key].dim() - 1)))
    return out


# --------------------------------------------------------------------- attention


def prefix_shared_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: torch.Tensor | None, scaling: float | None = None,
                            dropout: float = 0.0, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers attention-interface function over (pairs, heads, row, dim):
    the prompt's queries causally over the prompt's keys, the responses'
    queries over all keys under the layout's mask. Returns (pairs, row, heads, dim)."""
    suffix_mask = kwargs.get(MASK_KWARG)
    if suffix_mask is None:
        raise RuntimeError(f"{ATTN_NAME} attention needs the `{MASK_KWARG}` keyword (a prefix-shared batch)")
    heads = query.shape[1]
    if key.shape[1] != heads:  # grouped-query attention
        repeat = heads // key.shape[1]
        key, value = key.repeat_interleave(repeat, dim=1), value.repeat_interleave(repeat, dim=1)
    width = query.shape[2] - suffix_mask.shape[1]
    drop = dropout if module.training else 0.0
    prompt = F.scaled_dot_product_attention(query[:, :, :width], key[:, :, :width], value[:, :, :width],
                                            is_causal=True, dropout_p=drop, scale=scaling)
    responses = F.scaled_dot_product_attention(query[:, :, width:], key, value, attn_mask=suffix_mask[:, None],
                                               dropout_p=drop, scale=scaling)
    return torch.cat([prompt, responses], dim=2).transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTN_NAME, prefix_shared_attention)


def _decoder_attention_configs(model: torch.nn.Module) -> list:
    """The configs the decoder's self-attention layers read `_attn_implementation` from."""
    seen: dict[int, Any] = {}
    for module in model.modules():
        config = getattr(module, "config", None)
        if hasattr(module, "layer_idx") and config is not None and getattr(module, "is_causal", False):
            seen[id(config)] = config
    return list(seen.values())


@contextmanager
def shared_attention(model: torch.nn.Module) -> Iterator[None]:
    """The decoder attends with `prefix_shared_attention` inside the block.

    Held over a whole training step, not one forward: gradient checkpointing
    recomputes the layers during backward, and they must attend the same way
    then. transformers builds no mask for an implementation it has no mask
    function for, so the layout's own mask is the only one."""
    configs = _decoder_attention_configs(model)
    with attention_implementation(configs, ATTN_NAME):
        yield


def holding(model: torch.nn.Module, enabled: bool):
    """`shared_attention(model)` when enabled, else nothing."""
    return shared_attention(model) if enabled else nullcontext()


# ----------------------------------------------------------------------- forward


def supports_prefix_sharing(model: torch.nn.Module) -> bool:
    from csr.engine.models import adapter_for

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return adapter_for(base).prefix_shared_training and bool(_decoder_attention_configs(base))


def resolve_forward(forward: str, model: torch.nn.Module) -> bool:
    """Whether training runs prefix-shared: `auto` where the model supports it,
    `prefix-shared` refused where it does not."""
    if forward not in FORWARDS:
        raise ValueError(f"unknown forward {forward!r} (one of {', '.join(FORWARDS)})")
    if forward == "concatenated":
        return False
    supported = supports_prefix_sharing(model)
    if forward == "prefix-shared" and not supported:
        raise ValueError(
            f"forward = \"prefix-shared\" supports {', '.join(prefix_shared_families())} models, "
            f"not {model.config.model_type}; use \"auto\" or \"concatenated\""
        )
    return supported


def shared_logps(model: torch.nn.Module, layout: dict[str, torch.Tensor], **model_kwargs: Any):
    """Per-token fields of every response token, read from one prefix-shared
    forward: (log_probs with gradient, entropy, mean_logits, is_top1), each of
    shape (response tokens,) in `layout`'s order. `model` is the
    LlavaForConditionalGeneration or LlavaNextForConditionalGeneration (LoRA
    layers in place); `model_kwargs` the image inputs (pixel_values, image_sizes, ...)."""
    with shared_attention(model):
        hidden = model.base_model(
            input_ids=layout["input_ids"],
            position_ids=layout["position_ids"],
            attention_mask=None,
            use_cache=False,
            **{MASK_KWARG: layout["suffix_mask"]},
            **model_kwargs,
        ).last_hidden_state
    picked = hidden[layout["src_row"], layout["src_col"]]
    lm_head = model.get_output_embeddings()
    logits = lm_head(picked.to(lm_head.weight.device)).float()
    log_softmax = torch.log_softmax(logits, dim=-1)
    labels = layout["labels"].to(logits.device)
    log_probs = log_softmax.gather(-1, labels[:, None]).squeeze(-1)
    with torch.no_grad():
        entropy = -(log_softmax.exp() * log_softmax).sum(-1)
        mean_logits = logits.mean(-1)
        is_top1 = logits.argmax(-1) == labels
    return log_probs, entropy, mean_logits, is_top1


def _as_concatenated(values: torch.Tensor, layout: dict[str, torch.Tensor], shape: tuple[int, int]) -> torch.Tensor:
    """Per-token values put where the concatenated forward has them (zeros elsewhere)."""
    out = values.new_zeros(shape)
    return out.index_put((layout["out_row"].to(out.device), layout["out_col"].to(out.device)), values)


# Keywords TRL passes for the concatenated rows; the layout replaces them.
_CONCATENATED_KWARGS = ("input_ids", "attention_mask", "labels", "shift_labels", "num_items_in_batch", "use_cache",
                        "output_router_logits")


def install(model: torch.nn.Module) -> None:
    """Wrap the model's forward (after TRL's fused LM head): a call that carries
    `LAYOUT_KEY` runs prefix-shared and returns TRL's per-token output in the
    concatenated layout; any other call is the forward it was."""
    from trl.trainer.utils import FusedCausalLMOutput

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(base, "_csr_prefix_shared", False):
        return
    inner = base.forward

    @functools.wraps(inner)
    def forward(*args: Any, **kwargs: Any):
        layout = kwargs.pop(LAYOUT_KEY, None)
        if layout is None:
            return inner(*args, **kwargs)
        if args or not kwargs.pop("fused_lm_head", False):
            raise ValueError("a prefix-shared batch is scored through TRL's fused LM head only (fused_lm_head=True)")
        rows, width = kwargs["input_ids"].shape
        for name in _CONCATENATED_KWARGS:
            kwargs.pop(name, None)
        log_probs, entropy, mean_logits, is_top1 = shared_logps(base, layout, **kwargs)
        shape = (rows, width - 1)
        out = [_as_concatenated(v, layout, shape) for v in (log_probs, entropy, mean_logits)]
        top1 = _as_concatenated(is_top1, layout, shape)
        label_mask = _as_concatenated(torch.ones_like(is_top1), layout, shape)
        return FusedCausalLMOutput(
            loss=-log_probs.sum() / max(log_probs.numel(), 1),
            log_probs=out[0], entropy=out[1], log_sum_sq_probs=None, mean_logits=out[2], is_top1=top1,
            label_mask=label_mask, aux_loss=None,
        )

    base.forward = forward
    base._csr_prefix_shared = True
