"""The one chat-prompt builder: generation, training and evaluation all encode
(image, prompt) here, so DPO scores each response in exactly the context it
was generated in, and CHAIR and POPE ask the model the way it was trained.
"""

from __future__ import annotations

from typing import Any

# Used when a processor ships no chat template: LLaVA-1.5's conversation format.
FALLBACK_PROMPT = "USER: <image>\n{prompt} ASSISTANT:"
IMAGE_PLACEHOLDER = "<image>"


def chat_prompt(processor, user_prompt: str) -> str:
    """The model's prompt text for one image and one user question: the one
    definition generation, training and evaluation share, so that DPO scores
    responses in the context they were generated in.

    LLaVA prompt sets carry their own "<image>" markers; they are removed
    here because the chat template places the image itself.
    """
    text = user_prompt.replace(IMAGE_PLACEHOLDER, "").strip()
    if getattr(processor, "chat_template", None):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
        return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return FALLBACK_PROMPT.format(prompt=text)


def encode_prompts(processor, images: list, user_prompts: list[str]) -> Any:
    """Processor outputs for a batch of (image, prompt), left-padded, with the
    tokenizer's own special tokens (LLaVA-1.5's BOS) as generation has them."""
    return processor(
        text=[chat_prompt(processor, p) for p in user_prompts],
        images=images,
        padding=True,
        padding_side="left",
        return_tensors="pt",
    )
