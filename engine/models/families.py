"""The families csr drives, one `Adapter` each (engine/models/base.py).

Facts here come from transformers' own model code (5.x): the module names
of the decoder and the projector, how positions are made, which layers
slide. `checked` lists what tests/test_families.py checks on a tiny random
model of the family built from its config (engine/models/tiny.py);
docs/models.md is generated from this table (engine/models/docs.py).
"""

from __future__ import annotations

from csr.engine.models.base import Adapter, MRopeAdapter

# What tests/test_families.py checks for every family in the table.
SEARCH_EQUALS_FORWARD = "search log-probs = the model's forward (1e-5, float32)"
DEPTH0_EQUALS_GENERATE = "search depth 0, group 0 = greedy generate (ids; log-probs 1e-4)"
TEACHER_FORCED = "response sums = teacher-forced log-probs (1e-4)"
SHARED_EQUALS_PER_ROW = "shared-prefix search = per-row search"
END_TO_END = "generate, curate, train, register (step-1 DPO loss ln 2); the merged version searches"
IMAGE_SIZES = "images of different sizes"
FAMILY_CHECKS = (SEARCH_EQUALS_FORWARD, DEPTH0_EQUALS_GENERATE, TEACHER_FORCED, SHARED_EQUALS_PER_ROW, END_TO_END,
                 IMAGE_SIZES)
PER_ROW_CHECKS = tuple(c for c in FAMILY_CHECKS if c != SHARED_EQUALS_PER_ROW)

LLAVA = Adapter(
    family="LLaVA-1.5",
    model_types=("llava",),
    hub_ids=("llava-hf/llava-1.5-7b-hf", "llava-hf/llava-1.5-13b-hf"),
    # The authors' code prompts with LLaVA's conversation v1 (engine/prompting.py).
    templates=("chat", "llava-v1"),
    projector_names=("multi_modal_projector", "mm_projector"),
    checked=FAMILY_CHECKS,
    notes="the paper's model; prompt_template llava-v1 is the released code's conversation",
    prefix_shared_training=True,
    engine_decode=True,
)

LLAVA_NEXT = Adapter(
    family="LLaVA-NeXT",
    model_types=("llava_next",),
    hub_ids=("llava-hf/llava-v1.6-mistral-7b-hf", "llava-hf/llava-v1.6-vicuna-7b-hf"),
    checked=FAMILY_CHECKS,
    notes="any-resolution tiles: the image token count varies with the image size (image_sizes)",
    prefix_shared_training=True,
)

LLAVA_ONEVISION = Adapter(
    family="LLaVA-OneVision",
    model_types=("llava_onevision",),
    hub_ids=("llava-hf/llava-onevision-qwen2-0.5b-ov-hf", "llava-hf/llava-onevision-qwen2-7b-ov-hf"),
    checked=FAMILY_CHECKS,
    notes="any-resolution tiles (image_sizes); Qwen2 decoder",
)

QWEN2_VL = MRopeAdapter(
    family="Qwen2-VL",
    model_types=("qwen2_vl",),
    hub_ids=("Qwen/Qwen2-VL-2B-Instruct", "Qwen/Qwen2-VL-7B-Instruct"),
    projector_names=("merger",),
    checked=FAMILY_CHECKS,
    notes="M-RoPE: rows continue at text index + rope delta; image_grid_thw, mm_token_type_ids",
)

QWEN2_5_VL = MRopeAdapter(
    family="Qwen2.5-VL",
    model_types=("qwen2_5_vl",),
    hub_ids=("Qwen/Qwen2.5-VL-3B-Instruct", "Qwen/Qwen2.5-VL-7B-Instruct"),
    projector_names=("merger",),
    checked=FAMILY_CHECKS,
    notes="M-RoPE as Qwen2-VL; windowed vision attention",
)

QWEN3_VL = MRopeAdapter(
    family="Qwen3-VL",
    model_types=("qwen3_vl",),
    hub_ids=("Qwen/Qwen3-VL-2B-Instruct", "Qwen/Qwen3-VL-8B-Instruct"),
    projector_names=("merger",),
    checked=FAMILY_CHECKS,
    notes="interleaved M-RoPE; deepstack visual features enter early decoder layers",
)

GEMMA3 = Adapter(
    family="Gemma 3",
    model_types=("gemma3",),
    hub_ids=("google/gemma-3-4b-it", "google/gemma-3-12b-it"),
    per_row_reason="sliding-window layers (the shared prefix holds every key; a window does not)",
    nested_images=True,
    checked=PER_ROW_CHECKS,
    notes="image tokens attend to each other both ways in the prompt (token_type_ids); per-row search",
)

IDEFICS3 = Adapter(
    family="Idefics3",
    model_types=("idefics3",),
    hub_ids=("HuggingFaceM4/Idefics3-8B-Llama3",),
    language_model_names=("text_model",),
    projector_names=("connector",),
    checked=FAMILY_CHECKS,
    notes="image split into tiles plus a global view (pixel_attention_mask)",
)

SMOLVLM = Adapter(
    family="SmolVLM",
    model_types=("smolvlm",),
    hub_ids=("HuggingFaceTB/SmolVLM-Instruct", "HuggingFaceTB/SmolVLM2-2.2B-Instruct"),
    language_model_names=("text_model",),
    projector_names=("connector",),
    # Its processor reads a flat list of images as all belonging to the first prompt.
    nested_images=True,
    checked=FAMILY_CHECKS,
    notes="Idefics3's architecture under its own classes (tiles plus a global view); "
    "its processor needs the num2words package",
)

INTERNVL = Adapter(
    family="InternVL",
    model_types=("internvl",),
    hub_ids=("OpenGVLab/InternVL3-1B-hf", "OpenGVLab/InternVL3-8B-hf"),
    checked=FAMILY_CHECKS,
    notes="the -hf conversions transformers ships (the original checkpoints need remote code)",
)

MISTRAL3 = Adapter(
    family="Mistral 3 (Pixtral)",
    model_types=("mistral3",),
    hub_ids=("mistralai/Mistral-Small-3.1-24B-Instruct-2503",),
    checked=FAMILY_CHECKS,
    notes="Pixtral vision encoder: image token count follows the image size (image_sizes); a text config "
    "with a sliding_window (Mistral Small 3.1 has none) gives a sliding cache and the per-row search",
)

ADAPTERS: tuple[Adapter, ...] = (
    LLAVA, LLAVA_NEXT, LLAVA_ONEVISION, QWEN2_VL, QWEN2_5_VL, QWEN3_VL, GEMMA3, IDEFICS3, SMOLVLM, INTERNVL, MISTRAL3,
)

# Families csr refuses, with the reason (model_type -> reason).
REFUSED: dict[str, str] = {
    "llava_llama": "VILA needs the authors' remote code (trust_remote_code), which csr does not run",
}
