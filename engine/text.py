"""Text as the store keeps it: the decode of generated token ids, made portable.

Token ids are the truth; a text is their decode. Two rules make that decode
safe to store and to split into sentences:

- **Portable.** PostgreSQL `text` cannot hold NUL, and a lone surrogate cannot
  be encoded as UTF-8 at all. A byte-fallback tokenizer (Llama's) can emit
  both. `portable` replaces each NUL and each lone surrogate with U+FFFD, the
  character the decoder already uses for invalid UTF-8. The ids stay exact, so
  nothing is lost; SQLite and PostgreSQL then hold the same text, and rewards
  and curation see the same text on both.
- **Stable increments.** A candidate's text is what its tokens add to its
  parent's decoded text, so that a path's texts concatenate to the decoded
  response. A decode that ends inside a multi-byte character (a sentence cut
  by `max_new_tokens` between byte-fallback tokens) shows U+FFFD there, which
  the next tokens may turn into the real character; such a trailing run is
  held back from a non-final candidate and appears in its child's text.
"""

from __future__ import annotations

import re

REPLACEMENT = "\ufffd"
_UNPORTABLE = re.compile("[\x00\ud800-\udfff]")


def portable(text: str) -> str:
    """`text` with NUL and lone surrogates replaced by U+FFFD."""
    return _UNPORTABLE.sub(REPLACEMENT, text)


def settled(decoded: str) -> str:
    """The part of a partial decode that later tokens cannot change."""
    return decoded.rstrip(REPLACEMENT)


def increment(parent_text: str, decoded: str, final: bool) -> str:
    """The text a candidate adds to `parent_text` (its parent's settled decode),
    given the decode of its whole path."""
    shown = decoded if final else settled(decoded)
    if shown.startswith(parent_text):
        return shown[len(parent_text) :]
    # A tokenizer whose decode of the prefix changes with what follows (not
    # SentencePiece or byte-level BPE): the path text is still the decode,
    # only the split between sentences is approximate.
    common = 0
    for a, b in zip(parent_text, shown, strict=False):
        if a != b:
            break
        common += 1
    return shown[common:]


def is_blank(text: str) -> bool:
    """No visible character: the one definition of an empty sentence."""
    return not text.strip()
