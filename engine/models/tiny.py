"""Tiny random models of every family engine/models drives, built in-process
from each family's own config and processor classes (no download), with a
word-level tokenizer holding the family's special tokens and a chat template
shaped like the family's. tests/test_families.py and bench/bench_search.py
search and train them exactly as a user's checkpoint.

`build_tiny(family)` returns (model, processor); `save_pretrained` from
engine/demo/tiny.py writes them where `load_policy` reads them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

WORDS = (
    "a the red green blue square circle cat dog on in of with and is image picture shows there "
    "white black small large left right top bottom describe this detail what colour shape it sits "
    "user assistant system model : . , ? ! \n"
)
BASE_SPECIALS = ["<pad>", "<unk>", "<s>", "</s>"]
TEXT = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 2048}


def word_tokenizer(specials: list[str], extra: dict[str, str] | None = None, chat_template: str | None = None):
    """A word-level fast tokenizer: the base specials, then the family's (so
    their ids are fixed), "." a token of its own."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    tok.train_from_iterator([WORDS], trainer=trainers.WordLevelTrainer(special_tokens=BASE_SPECIALS + specials))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        extra_special_tokens=extra or {},
    )
    if chat_template:
        tokenizer.chat_template = chat_template
    return tokenizer


def _template(turn_open: str, turn_close: str, image: str, assistant: str) -> str:
    """A single-turn chat template: user turn with the image then the text, open assistant turn."""
    return (
        "{% for message in messages %}" + turn_open + "{% for item in message['content'] %}"
        "{% if item['type'] == 'image' %}" + image + "{% elif item['type'] == 'text' %}{{ item['text'] }}"
        "{% endif %}{% endfor %}" + turn_close + "{% endfor %}"
        "{% if add_generation_prompt %}" + assistant + "{% endif %}"
    )


def _ids(tokenizer, *tokens: str) -> list[int]:
    return [tokenizer.convert_tokens_to_ids(t) for t in tokens]


def _text_config(tokenizer, **extra) -> dict:
    return {**TEXT, "vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
            "tie_word_embeddings": False, **extra}


def _finish(model, tokenizer):
    model.eval()
    for name in ("pad_token_id", "eos_token_id", "bos_token_id"):
        setattr(model.generation_config, name, getattr(tokenizer, name))
    return model


# ------------------------------------------------------------------ Qwen-VL


QWEN_SPECIALS = ["<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>", "<|im_start|>", "<|im_end|>"]
QWEN_TEMPLATE = _template("<|im_start|>{{ message['role'] }}\n", "<|im_end|>\n",
                          "<|vision_start|><|image_pad|><|vision_end|>", "<|im_start|>assistant\n")


def _qwen(config_class, model_class, processor_class, image_processor_class, video_processor_class,
          vision: dict, text_extra: dict, seed: int):
    tokenizer = word_tokenizer(QWEN_SPECIALS, {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"})
    start, image, end, video = _ids(tokenizer, "<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>")
    config = config_class(
        text_config=_text_config(tokenizer, **text_extra), vision_config=vision,
        image_token_id=image, video_token_id=video, vision_start_token_id=start, vision_end_token_id=end,
    )
    torch.manual_seed(seed)
    model = _finish(model_class(config), tokenizer)
    pixels = {"patch_size": vision["patch_size"], "merge_size": 2, "temporal_patch_size": 2,
              "min_pixels": 8 * 8, "max_pixels": 32 * 32}
    processor = processor_class(image_processor=image_processor_class(**pixels), tokenizer=tokenizer,
                                video_processor=video_processor_class(**pixels), chat_template=QWEN_TEMPLATE)
    return model, processor


def qwen2_vl(seed: int = 0):
    from transformers import (
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    vision = {"depth": 2, "embed_dim": 32, "hidden_size": 64, "num_heads": 4, "patch_size": 4,
              "spatial_merge_size": 2, "temporal_patch_size": 2, "mlp_ratio": 2}
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}
    return _qwen(Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor, Qwen2VLImageProcessor,
                 Qwen2VLVideoProcessor, vision, {"rope_parameters": rope}, seed)


def qwen2_5_vl(seed: int = 0):
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
    )

    vision = {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 4, "patch_size": 4,
              "spatial_merge_size": 2, "temporal_patch_size": 2, "out_hidden_size": TEXT["hidden_size"],
              "window_size": 16, "fullatt_block_indexes": [1]}
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}
    return _qwen(Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor, Qwen2VLImageProcessor,
                 Qwen2VLVideoProcessor, vision, {"rope_parameters": rope}, seed)


def qwen3_vl(seed: int = 0):
    from transformers import (
        Qwen2VLImageProcessor,
        Qwen3VLConfig,
        Qwen3VLForConditionalGeneration,
        Qwen3VLProcessor,
        Qwen3VLVideoProcessor,
    )

    vision = {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 4, "patch_size": 4,
              "spatial_merge_size": 2, "temporal_patch_size": 2, "out_hidden_size": TEXT["hidden_size"],
              "num_position_embeddings": 64, "deepstack_visual_indexes": [0]}
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3], "mrope_interleaved": True}
    return _qwen(Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLProcessor, Qwen2VLImageProcessor,
                 Qwen3VLVideoProcessor, vision, {"rope_parameters": rope, "head_dim": 16}, seed)


# ------------------------------------------------------------------ LLaVA


LLAVA_TEMPLATE = _template("USER: ", " ", "<image>\n", "ASSISTANT:")


def llava(seed: int = 0):
    from csr.engine.demo.tiny import build_tiny_llava

    tokenizer = word_tokenizer(["<image>"], {"image_token": "<image>"})
    model, processor = build_tiny_llava(tokenizer, seed=seed)
    return model, processor


def _clip_vision(image_size: int = 32, patch_size: int = 8) -> dict:
    return {"model_type": "clip_vision_model", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4, "image_size": image_size, "patch_size": patch_size, "projection_dim": 32}


def _siglip_vision(image_size: int = 32, patch_size: int = 8) -> dict:
    return {"model_type": "siglip_vision_model", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4, "image_size": image_size, "patch_size": patch_size}


def _anyres(config_class, model_class, processor_class, image_processor_class, seed: int, text_type: str):
    # OneVision: a SigLIP tower (no CLS token) and the "full" strategy, as its checkpoints;
    # NeXT: CLIP, whose CLS token the "default" strategy drops.
    onevision = "onevision" in config_class.__name__.lower()
    strategy = "full" if onevision else "default"
    tokenizer = word_tokenizer(["<image>", "<video>"], {"image_token": "<image>", "video_token": "<video>"})
    image, video = _ids(tokenizer, "<image>", "<video>")
    grid = [[32, 32], [32, 64], [64, 32], [64, 64]]
    config = config_class(
        vision_config=_siglip_vision() if onevision else _clip_vision(),
        text_config={"model_type": text_type, **_text_config(tokenizer)},
        image_token_index=image, image_grid_pinpoints=grid, vision_feature_select_strategy=strategy,
        vision_feature_layer=-1, **({"video_token_index": video} if onevision else {}),
    )
    torch.manual_seed(seed)
    model = _finish(model_class(config), tokenizer)
    image_processor = image_processor_class(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, image_grid_pinpoints=grid,
        **({"do_center_crop": False} if "onevision" not in image_processor_class.__name__.lower() else {}),
    )
    extra = {}
    if "onevision" not in processor_class.__name__.lower():
        extra["num_additional_image_tokens"] = 1  # the CLS token the "default" strategy then drops
    if "onevision" in processor_class.__name__.lower():
        from transformers import LlavaOnevisionVideoProcessor

        extra["video_processor"] = LlavaOnevisionVideoProcessor(size={"height": 32, "width": 32})
        extra["num_image_tokens"] = (32 // 8) ** 2
    processor = processor_class(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=8, vision_feature_select_strategy=strategy,
        chat_template=LLAVA_TEMPLATE, **extra,
    )
    return model, processor


def llava_next(seed: int = 0):
    from transformers import (
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessor,
        LlavaNextProcessor,
    )

    return _anyres(LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextProcessor, LlavaNextImageProcessor,
                   seed, "llama")


def llava_onevision(seed: int = 0):
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionImageProcessor,
        LlavaOnevisionProcessor,
    )

    return _anyres(LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, LlavaOnevisionProcessor,
                   LlavaOnevisionImageProcessor, seed, "qwen2")


# ------------------------------------------------------------------ Gemma 3


GEMMA3_SPECIALS = ["<start_of_image>", "<end_of_image>", "<image_soft_token>", "<start_of_turn>", "<end_of_turn>"]
GEMMA3_TEMPLATE = _template("<start_of_turn>{{ message['role'] }}\n", "<end_of_turn>\n", "<start_of_image>",
                            "<start_of_turn>model\n")


def gemma3(seed: int = 0, sliding_window: int = 8):
    """A sliding layer then a full one; the window (8) is shorter than the prompt, so it matters."""
    from transformers import (
        Gemma3Config,
        Gemma3ForConditionalGeneration,
        Gemma3ImageProcessor,
        Gemma3Processor,
    )

    tokenizer = word_tokenizer(GEMMA3_SPECIALS, {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                                                 "image_token": "<image_soft_token>"})
    boi, eoi, image = _ids(tokenizer, "<start_of_image>", "<end_of_image>", "<image_soft_token>")
    text = _text_config(tokenizer, head_dim=16, sliding_window=sliding_window, query_pre_attn_scalar=16,
                        layer_types=["sliding_attention", "full_attention"])
    config = Gemma3Config(text_config=text, vision_config=_siglip_vision(), mm_tokens_per_image=4,
                          boi_token_index=boi, eoi_token_index=eoi, image_token_index=image)
    torch.manual_seed(seed)
    model = _finish(Gemma3ForConditionalGeneration(config), tokenizer)
    processor = Gemma3Processor(image_processor=Gemma3ImageProcessor(size={"height": 32, "width": 32}),
                                tokenizer=tokenizer, chat_template=GEMMA3_TEMPLATE, image_seq_length=4)
    return model, processor


# ------------------------------------------------------------------ Idefics3 / SmolVLM


IDEFICS_SPECIALS = ["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>", "<video>",
                    *(f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7))]
IDEFICS_TEMPLATE = _template("<|im_start|>{{ message['role'] | capitalize }}:", "<end_of_utterance>\n", "<image>",
                             "<|im_start|>Assistant:")


def _idefics(config_class, model_class, processor_class, image_processor_class, seed: int, **processor_extra):
    """Images up to 64 px split into 32 px tiles plus a global view: the image-token count varies."""
    tokenizer = word_tokenizer(["<|im_start|>", *IDEFICS_SPECIALS],
                               {"image_token": "<image>", "fake_image_token": "<fake_token_around_image>",
                                "global_image_token": "<global-img>", "end_of_utterance_token": "<end_of_utterance>",
                                "video_token": "<video>"})
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
              "image_size": 32, "patch_size": 8}
    config = config_class(vision_config=vision, text_config={"model_type": "llama", **_text_config(tokenizer)},
                          scale_factor=2, image_token_id=tokenizer.convert_tokens_to_ids("<image>"))
    torch.manual_seed(seed)
    model = _finish(model_class(config), tokenizer)
    image_processor = image_processor_class(size={"longest_edge": 64}, max_image_size={"longest_edge": 32},
                                            do_image_splitting=True)
    processor = processor_class(image_processor=image_processor, tokenizer=tokenizer, image_seq_len=4,
                                chat_template=IDEFICS_TEMPLATE, **processor_extra)
    return model, processor


def idefics3(seed: int = 0):
    from transformers import (
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3ImageProcessor,
        Idefics3Processor,
    )

    return _idefics(Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor, Idefics3ImageProcessor, seed)


def smolvlm(seed: int = 0):
    """Idefics3's shapes under SmolVLM's own classes (its processor also takes videos)."""
    from transformers import (
        SmolVLMConfig,
        SmolVLMForConditionalGeneration,
        SmolVLMImageProcessor,
        SmolVLMProcessor,
        SmolVLMVideoProcessor,
    )

    return _idefics(SmolVLMConfig, SmolVLMForConditionalGeneration, SmolVLMProcessor, SmolVLMImageProcessor, seed,
                    video_processor=SmolVLMVideoProcessor(size={"longest_edge": 32}))


# ------------------------------------------------------------------ InternVL, Mistral 3


def internvl(seed: int = 0):
    """Images cropped into up to four 32 px patches plus a thumbnail: the image-token count varies."""
    from transformers import (
        GotOcr2ImageProcessor,
        InternVLConfig,
        InternVLForConditionalGeneration,
        InternVLProcessor,
        InternVLVideoProcessor,
    )

    tokenizer = word_tokenizer(["<img>", "</img>", "<IMG_CONTEXT>", "<video>", "<|im_start|>", "<|im_end|>"],
                               {"start_image_token": "<img>", "end_image_token": "</img>",
                                "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"})
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
              "image_size": [32, 32], "patch_size": [8, 8]}
    config = InternVLConfig(vision_config=vision, text_config={"model_type": "qwen2", **_text_config(tokenizer)},
                            image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"), image_seq_length=4,
                            downsample_ratio=0.5, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = _finish(InternVLForConditionalGeneration(config), tokenizer)
    image_processor = GotOcr2ImageProcessor(size={"height": 32, "width": 32}, crop_to_patches=True,
                                            min_patches=1, max_patches=4)
    processor = InternVLProcessor(
        image_processor=image_processor, tokenizer=tokenizer,
        video_processor=InternVLVideoProcessor(size={"height": 32, "width": 32}), image_seq_length=4,
        chat_template=_template("<|im_start|>{{ message['role'] }}\n", "<|im_end|>\n", "<IMG_CONTEXT>\n",
                                "<|im_start|>assistant\n"),
    )
    return model, processor


def mistral3(seed: int = 0):
    """A Pixtral tower over images up to 64 px: rows of patches with breaks, counts follow the size."""
    from transformers import (
        Mistral3Config,
        Mistral3ForConditionalGeneration,
        PixtralImageProcessor,
        PixtralProcessor,
    )

    tokenizer = word_tokenizer(["[IMG]", "[IMG_BREAK]", "[IMG_END]", "[INST]", "[/INST]"], {"image_token": "[IMG]"})
    vision = {"model_type": "pixtral", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 4, "head_dim": 8, "image_size": 64, "patch_size": 8}
    # No sliding window, as Mistral3Config's own text defaults (Mistral Small 3.1); the
    # Mistral text config's default of 4096 would give a sliding cache and the per-row path.
    text = {"model_type": "mistral", **_text_config(tokenizer), "sliding_window": None}
    config = Mistral3Config(vision_config=vision, text_config=text,
                            image_token_index=tokenizer.convert_tokens_to_ids("[IMG]"), spatial_merge_size=2,
                            tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = _finish(Mistral3ForConditionalGeneration(config), tokenizer)
    processor = PixtralProcessor(
        image_processor=PixtralImageProcessor(size={"longest_edge": 64}, patch_size=8), tokenizer=tokenizer,
        patch_size=8, spatial_merge_size=2,
        chat_template=_template("[INST]", "[/INST]", "[IMG]", ""),
    )
    return model, processor


BUILDERS: dict[str, Callable] = {
    "InternVL": internvl,
    "Mistral 3 (Pixtral)": mistral3,
    "Idefics3": idefics3,
    "SmolVLM": smolvlm,
    "Gemma 3": gemma3,
    "LLaVA-1.5": llava,
    "LLaVA-NeXT": llava_next,
    "LLaVA-OneVision": llava_onevision,
    "Qwen2-VL": qwen2_vl,
    "Qwen2.5-VL": qwen2_5_vl,
    "Qwen3-VL": qwen3_vl,
}


def build_tiny(family: str, seed: int = 0):
    """(model, processor) of a tiny random model of `family` (an Adapter's family name)."""
    return BUILDERS[family](seed)
