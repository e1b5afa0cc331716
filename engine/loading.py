"""Loading the policy (a vision-language model of a family engine/models knows) and the CLIP scorer.

Both load from a hub id or a local directory through the libraries' own
loaders (`transformers` Auto classes, `open_clip`), so a tiny model saved by
`csr.engine.demo.tiny` goes through the same path as a user's 7B checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from csr.engine.errors import ModelLoadError
from csr.engine.models import LLAVA, Adapter, adapter_for, check_family

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def _resolve_dtype(dtype: Any, device: str) -> Any:
    if dtype is None:
        # Half precision on CPU is slow and not bit-stable; on a GPU keep the checkpoint's own dtype.
        return torch.float32 if str(device).startswith("cpu") else "auto"
    if isinstance(dtype, str) and dtype != "auto":
        if dtype not in _DTYPES:
            raise ModelLoadError(f"unknown dtype {dtype!r}; choose one of {', '.join(_DTYPES)}")
        return _DTYPES[dtype]
    return dtype


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or Path(name).exists() or name.count("/") > 1


@dataclass
class Policy:
    """A loaded policy model with what the search needs to drive it."""

    name: str
    model: Any
    processor: Any
    tokenizer: Any
    device: str
    sentence_end_ids: tuple[int, ...]
    eos_token_id: int
    # Ids the search never selects (`unreturnable_ids`): none when built by hand.
    masked_ids: tuple[int, ...] = ()
    stop_ids: tuple[int, ...] = field(init=False)
    # What csr knows of the model's architecture (engine/models); found from its config when not given.
    adapter: Adapter = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        # EOS first: when a token is both, it ends the response, not just the sentence.
        self.stop_ids = tuple(dict.fromkeys([self.eos_token_id, *self.sentence_end_ids]))
        if self.adapter is None:
            # A policy built by hand around no model (tests of the tree logic) is driven as LLaVA-1.5.
            self.adapter = adapter_for(self.model) if self.model is not None else LLAVA

    def build_prompt(self, user_prompt: str, template: str = "chat") -> str:
        return self.adapter.build_prompt(self.processor, user_prompt, template)

    def encode(self, image, user_prompt: str, template: str = "chat") -> dict[str, torch.Tensor]:
        """Processor outputs (input ids with image placeholders expanded, pixel values, ...)."""
        inputs = self.adapter.encode(self.processor, [image], [user_prompt], template)
        return self.adapter.to_model(inputs, self.device, self.model.dtype)

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)


def find_sentence_end_ids(tokenizer) -> tuple[int, ...]:
    """Token ids that are a full stop, possibly with whitespace around it.

    A real BPE vocabulary has several ("." and ".\\n", or "▁."); tokens that
    merely end with "." (abbreviations like "Mr." or "...") are not counted,
    so that a sentence does not end inside "Mr. Smith".
    """
    special = set(tokenizer.all_special_ids)
    ids = [i for i in range(len(tokenizer)) if i not in special]
    texts = tokenizer.batch_decode([[i] for i in ids], skip_special_tokens=False)
    found = tuple(i for i, t in zip(ids, texts, strict=True) if t.strip() == ".")
    if not found:
        raise ModelLoadError("the tokenizer has no token for '.'; cannot split sentences")
    return found


def placeholder_ids(model_config, processor) -> tuple[int, ...]:
    """The image (and video) placeholder ids, as the model's adapter knows them
    (`Adapter.placeholder_ids`): the search never selects one."""
    return adapter_for(model_config).placeholder_ids(model_config, processor)


def unreturnable_ids(model, processor, tokenizer, eos_token_id: int) -> tuple[int, ...]:
    """Ids the search must never select, since the model cannot take them back
    as text: the image/video placeholders, every special token but EOS (the
    decode drops them), and output ids past the tokenizer's vocabulary."""
    ids = set(placeholder_ids(model.config, processor))
    ids.update(int(i) for i in getattr(tokenizer, "all_special_ids", ()) or ())
    for token_id, added in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
        if getattr(added, "special", False):
            ids.add(int(token_id))
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and hasattr(head, "weight"):
        ids.update(range(len(tokenizer), int(head.weight.shape[0])))
    ids.discard(int(eos_token_id))
    return tuple(sorted(ids))


def period_token_id(tokenizer) -> int:
    """The id of the token "." itself, the one id the released code ends a
    sentence at (`--period_id 29889`: "." in Llama's vocabulary, where "▁."
    is 869 and also decodes to "."). A vocabulary without that exact token
    falls back to the first full-stop id."""
    special = set(tokenizer.all_special_ids)
    token = tokenizer.convert_tokens_to_ids(".")
    unk = getattr(tokenizer, "unk_token_id", None)
    if isinstance(token, int) and token not in special and token != unk and tokenizer.decode([token]) == ".":
        return token
    return find_sentence_end_ids(tokenizer)[0]


def _eos_token_id(model, tokenizer) -> int:
    eos = tokenizer.eos_token_id
    if eos is None:
        eos = getattr(model.generation_config, "eos_token_id", None)
        if isinstance(eos, (list, tuple)):
            eos = eos[0] if eos else None
    if eos is None:
        raise ModelLoadError("the model defines no end-of-sequence token")
    return int(eos)


def load_policy(
    name_or_path: str,
    device: str = "cpu",
    dtype: Any = None,
    sentence_end_ids: tuple[int, ...] | None = None,
) -> Policy:
    """Load a vision-language model and its processor from a local directory or hub id."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    source = _policy_source(name_or_path)
    check_family(source)
    torch_dtype = _resolve_dtype(dtype, device)
    try:
        processor = AutoProcessor.from_pretrained(source)
        model = AutoModelForImageTextToText.from_pretrained(source, dtype=torch_dtype)
    except Exception as exc:
        raise _not_loadable(source, exc) from exc
    model.to(device).eval()
    adapter = adapter_for(model)
    tokenizer = getattr(processor, "tokenizer", None)
    if tokenizer is None:
        raise ModelLoadError(f"the processor of {source!r} has no tokenizer")
    ends = tuple(sentence_end_ids) if sentence_end_ids else find_sentence_end_ids(tokenizer)
    eos = _eos_token_id(model, tokenizer)
    return Policy(
        name=str(name_or_path),
        model=model,
        processor=processor,
        tokenizer=tokenizer,
        device=str(device),
        sentence_end_ids=ends,
        eos_token_id=eos,
        masked_ids=unreturnable_ids(model, processor, tokenizer, eos),
        adapter=adapter,
    )


def _policy_source(name_or_path: str) -> str:
    source = str(name_or_path)
    if _looks_like_path(source):
        path = Path(source).expanduser()
        if not path.is_dir():
            raise ModelLoadError(f"model directory not found: {path}")
        source = str(path)
    return source


def _not_loadable(source: str, exc: Exception) -> ModelLoadError:
    # The libraries' messages run over several lines (advice, URLs): the first says what failed.
    lines = str(exc).strip().splitlines()
    return ModelLoadError(
        f"could not load a vision-language model from {source!r} "
        f"(neither a loadable local directory nor a hub id): {type(exc).__name__}: {lines[0] if lines else ''}"
    )


def check_policy(name_or_path: str) -> None:
    """What load_policy fails on first, without loading weights: the directory
    or hub id and the model's configuration. Cheap enough to run before a
    command writes anything that depends on the model."""
    from transformers import AutoConfig

    source = _policy_source(name_or_path)
    check_family(source)
    try:
        config = AutoConfig.from_pretrained(source)
    except Exception as exc:
        raise _not_loadable(source, exc) from exc
    adapter_for(config)


@dataclass
class ClipScorer:
    """An open_clip model scoring image-sentence relevance as max(100 * cos, 0)."""

    name: str
    model: Any
    preprocess: Any
    tokenizer: Any
    device: str

    @torch.inference_mode()
    def encode_image(self, image) -> torch.Tensor:
        """The L2-normalised image embedding, shape (dim,); compute once per image."""
        pixels = self.preprocess(image.convert("RGB")).unsqueeze(0).to(self.device)
        return self.model.encode_image(pixels, normalize=True)[0].float()

    @torch.inference_mode()
    def raw_scores(self, image_embedding: torch.Tensor, texts: list[str]) -> list[float]:
        """100 * cos for each text, all texts in one batch. The tokenizer truncates
        at CLIP's context length (77 tokens), as the paper's max_new_tokens assumes."""
        if not texts:
            return []
        text_embeddings = self.encode_texts(texts)
        cosine = text_embeddings @ image_embedding.to(text_embeddings.device).float()
        return (100.0 * cosine).tolist()

    @torch.inference_mode()
    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        """The L2-normalised text embeddings, shape (len(texts), dim), in one batch
        (the search scores the sentences of several prompts in one)."""
        tokens = self.tokenizer(list(texts)).to(self.device)
        return self.model.encode_text(tokens, normalize=True).float()

    def score(self, image_embedding: torch.Tensor, texts: list[str]) -> list[float]:
        """R_I = max(100 * cos, 0) for each text (eq. 3)."""
        return [max(s, 0.0) for s in self.raw_scores(image_embedding, texts)]


def check_clip(name: str, pretrained: str | None = None) -> str | None:
    """What load_clip refuses before loading: a missing directory or an
    unknown model name; returns the pretrained tag that applies."""
    import open_clip

    if name.startswith("local-dir:"):
        path = Path(name[len("local-dir:") :]).expanduser()
        if not path.is_dir():
            raise ModelLoadError(f"CLIP directory not found: {path}")
        if not (path / "open_clip_config.json").is_file():
            raise ModelLoadError(f"CLIP directory {path} has no open_clip_config.json")
        pretrained = None
    elif name.startswith("hf-hub:"):
        pretrained = None
    elif name not in open_clip.list_models():
        raise ModelLoadError(
            f"unknown CLIP model {name!r}: use an open_clip model name (e.g. ViT-L-14-336), "
            "hf-hub:ORG/REPO or local-dir:PATH"
        )
    return pretrained


def load_clip(name: str, pretrained: str | None = None, device: str = "cpu") -> ClipScorer:
    """Load an open_clip model: `ViT-L-14-336` + pretrained tag, `hf-hub:org/repo`,
    or `local-dir:PATH` (the schemas ignore `pretrained`)."""
    import open_clip

    pretrained = check_clip(name, pretrained)
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            name, pretrained=pretrained, device=device
        )
        tokenizer = open_clip.get_tokenizer(name)
    except Exception as exc:
        detail = f" with pretrained={pretrained!r}" if pretrained else ""
        lines = str(exc).strip().splitlines()
        raise ModelLoadError(
            f"could not load CLIP model {name!r}{detail}: {type(exc).__name__}: {lines[0] if lines else ''}"
        ) from exc
    model.eval()
    return ClipScorer(name=name, model=model, preprocess=preprocess, tokenizer=tokenizer, device=str(device))
