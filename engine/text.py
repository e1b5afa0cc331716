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
- **Exact responses.** A decode can also rewrite text that had settled: the
  byte-fallback decoder of Llama's tokenizer shows a byte run that decoded
  cleanly ("é") as one U+FFFD per byte once the next candidate adds a byte
  that makes the run invalid. The parent's stored text cannot change then,
  so the child's increment is only approximate (`Increment.exact` is false,
  stored as `candidates.text_exact`); a response's text is always the
  portable decode of its whole token ids, never the concatenation.
"""

from __future__ import annotations

import re
from typing import NamedTuple

REPLACEMENT = "\ufffd"
_UNPORTABLE = re.compile("[\x00\ud800-\udfff]")


def portable(text: str) -> str:
    """`text` with NUL and lone surrogates replaced by U+FFFD."""
    return _UNPORTABLE.sub(REPLACEMENT, text)


def settled(decoded: str) -> str:
    """The part of a partial decode that later tokens cannot change."""
    return decoded.rstrip(REPLACEMENT)


class Increment(NamedTuple):
    text: str
    # False when the decode rewrote the parent's settled text: the path's
    # texts then no longer concatenate to its decode.
    exact: bool


def increment(parent_text: str, decoded: str, final: bool) -> Increment:
    """The text a candidate adds to `parent_text` (its parent's settled decode),
    given the decode of its whole path."""
    shown = decoded if final else settled(decoded)
    if shown.startswith(parent_text):
        return Increment(shown[len(parent_text) :], True)
    # The decode of the prefix changed with what followed (a byte run turned
    # invalid, or a tokenizer whose decode is not prefix-stable): the text
    # after the common prefix, flagged as approximate.
    common = 0
    for a, b in zip(parent_text, shown, strict=False):
        if a != b:
            break
        common += 1
    return Increment(shown[common:], False)


def is_blank(text: str) -> bool:
    """No visible character: the one definition of an empty sentence."""
    return not text.strip()
