"""The one chat-prompt builder: generation, training and evaluation all encode
(image, prompt) here, so DPO scores each response in exactly the context it
was generated in, and CHAIR and POPE ask the model the way it was trained.

Two templates (`[generate] prompt_template`, recorded with the iteration and
used again by `csr train` for that iteration's pairs):

- "chat": the processor's own chat template (for the hub's llava-1.5
  checkpoints: "USER: <image>\\n{prompt} ASSISTANT:", no system sentence);
- "llava-v1": LLaVA's `conv_vicuna_v1`, which the authors' released code
  builds with `conv_templates['v1']` (inference_csr/utils.py `get_prompts`)
  and trains with (`--version v1`): its system sentence, then
  " USER: <image>\\n{prompt} ASSISTANT:".
"""

from __future__ import annotations

from typing import Any, Literal, get_args

# Used when a processor ships no chat template: LLaVA-1.5's conversation format.
FALLBACK_PROMPT = "USER: <image>\n{prompt} ASSISTANT:"
IMAGE_PLACEHOLDER = "<image>"

PromptTemplate = Literal["chat", "llava-v1"]
PROMPT_TEMPLATES: tuple[str, ...] = get_args(PromptTemplate)

# conv_vicuna_v1.system, as the release's utils.py (and LLaVA's conversation.py) spell it:
# "curious user", "the user's questions" (conv_llava_v1 says "human"; `--version v1` is the vicuna one).
LLAVA_V1_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)


def llava_v1_prompt(user_prompt: str, image_token: str = IMAGE_PLACEHOLDER) -> str:
    """What `get_prompts` builds: conv_vicuna_v1 (SeparatorStyle.TWO, sep " ")
    with one user message "<image>\\n{question}" and an open assistant turn:
    system + " " + "USER: <image>\\n{question}" + " " + "ASSISTANT:". The
    question loses its "<image>" markers the way sample.py removes them."""
    question = user_prompt.replace("<image>\n", "").replace("\n<image>", "").replace(IMAGE_PLACEHOLDER, "")
    return f"{LLAVA_V1_SYSTEM} USER: {image_token}\n{question} ASSISTANT:"


def chat_prompt(processor, user_prompt: str, template: str = "chat") -> str:
    """The model's prompt text for one image and one user question: the one
    definition generation, training and evaluation share, so that DPO scores
    responses in the context they were generated in.

    LLaVA prompt sets carry their own "<image>" markers; they are removed
    here because the template places the image itself.
    """
    if template == "llava-v1":
        return llava_v1_prompt(user_prompt, getattr(processor, "image_token", None) or IMAGE_PLACEHOLDER)
    if template != "chat":
        raise ValueError(f"unknown prompt template {template!r}; choose one of {', '.join(PROMPT_TEMPLATES)}")
    text = user_prompt.replace(IMAGE_PLACEHOLDER, "").strip()
    if getattr(processor, "chat_template", None):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
        return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return FALLBACK_PROMPT.format(prompt=text)


def encode_prompts(processor, images: list, user_prompts: list[str], template: str = "chat") -> Any:
    """Processor outputs for a batch of (image, prompt), left-padded, with the
    tokenizer's own special tokens (LLaVA-1.5's BOS) as generation has them."""
    return processor(
        text=[chat_prompt(processor, p, template) for p in user_prompts],
        images=images,
        padding=True,
        padding_side="left",
        return_tensors="pt",
    )
