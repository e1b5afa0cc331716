"""A Llama-style SentencePiece tokenizer built with `tokenizers`, as real
LLaVA-1.5 has it: "▁" marks a space, unknown characters fall back to byte
tokens <0x00>..<0xFF> (so any byte, NUL and invalid UTF-8 included, can be
generated), and decoding drops the one leading space of a sequence."""

from __future__ import annotations

import json
from collections.abc import Iterable

from csr.engine.demo.tiny import IMAGE_TOKEN

SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", IMAGE_TOKEN]
BYTE_TOKENS = [f"<0x{b:02X}>" for b in range(256)]


def llama_style_tokenizer(corpus: Iterable[str], vocab_size: int = 400):
    import string

    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    # Learn merges on the "▁" form, then rebuild the model with byte fallback
    # and the byte tokens right after the specials, as in Llama's vocabulary.
    # Merges never cross a word's "▁", as in SentencePiece; every printable
    # ASCII character is a piece of its own.
    learner = Tokenizer(models.BPE(unk_token="<unk>"))
    learner.normalizer = normalizer
    learner.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
    alphabet = list(string.ascii_letters + string.digits + string.punctuation + "▁\n")
    learner.train_from_iterator(
        list(corpus),
        trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=["<unk>"], initial_alphabet=alphabet, show_progress=False
        ),
    )
    learned = json.loads(learner.to_str())["model"]
    vocab = {token: i for i, token in enumerate(SPECIALS[:1] + BYTE_TOKENS)}
    for token in sorted(learned["vocab"], key=learned["vocab"].get):
        vocab.setdefault(token, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learned["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizer
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.add_special_tokens(SPECIALS[1:])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": IMAGE_TOKEN},
    )


def piece_ids(tokenizer, text: str) -> list[int]:
    """Ids spelling `text` character by character, as a model may generate it:
    a space is "▁", a character without a piece of its own is its UTF-8 bytes."""
    vocab = tokenizer.get_vocab()
    ids = []
    for char in text.replace(" ", "▁"):
        if char in vocab:
            ids.append(vocab[char])
        else:
            ids.extend(vocab[f"<0x{b:02X}>"] for b in char.encode("utf-8"))
    return ids


def byte_ids(tokenizer, data: bytes) -> list[int]:
    vocab = tokenizer.get_vocab()
    return [vocab[f"<0x{b:02X}>"] for b in data]
