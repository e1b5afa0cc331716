"""Filters for degenerate candidate sentences.

The authors' released code (`inference_csr/utils.py: clean_tree`, `score.py`)
drops candidates with non-Latin scripts, emoji, long runs of one repeated word
or character, more than 5 newlines, or fewer than 4 characters. We keep such
candidates in the store with the reason instead of losing them; they never
become (part of) a final response. Whether they take a place in the search's
active set first, as in the released code, is `[generate] prune_degenerate`.

Two rule sets: `exclusion_reason` (csr's, the `paper` preset's default: more
scripts, case-insensitive repeats) and `released_exclusion_reason` (the
released code's rules exactly, the `reference-code` preset's: the text is
first passed through its `clean_text`, which deletes every character outside
a whitelist, emoji included, and the checks run on what is left).
"""

from __future__ import annotations

import re
from typing import Literal, get_args

# Reason codes stored in candidates.exclusion_reason.
NON_LATIN = "non_latin_script"
EMOJI = "emoji"
REPEATED_WORD = "repeated_word"
REPEATED_CHAR = "repeated_char"
TOO_MANY_NEWLINES = "too_many_newlines"
TOO_SHORT = "too_short"

MIN_CHARS = 4
MAX_NEWLINES = 5
# The released code flags 6 adjacent copies of a word and 11 of a character.
WORD_REPEATS = 6
CHAR_REPEATS = 11

# The released code lists Korean, Japanese kana and Cyrillic; CJK ideographs,
# Greek, Arabic, Hebrew, Devanagari and Thai are added since a LLaVA model
# drifting into them is just as degenerate for an English prompt set.
_NON_LATIN = re.compile(
    "["
    "\u0370-\u03ff"  # Greek
    "\u0400-\u04ff"  # Cyrillic
    "\u0590-\u05ff"  # Hebrew
    "\u0600-\u06ff"  # Arabic
    "\u0900-\u097f"  # Devanagari
    "\u0e00-\u0e7f"  # Thai
    "\u3040-\u30ff"  # Hiragana, Katakana
    "\u3130-\u318f"  # Hangul compatibility jamo
    "\u4e00-\u9fff"  # CJK unified ideographs
    "\uac00-\ud7af"  # Hangul syllables
    "]"
)
_EMOJI = re.compile(
    "["
    "\U0001f300-\U0001f5ff"
    "\U0001f600-\U0001f64f"
    "\U0001f680-\U0001f6ff"
    "\U0001f700-\U0001f77f"
    "\U0001f900-\U0001f9ff"
    "\u2600-\u27bf"  # misc symbols and dingbats
    "]"
)
_REPEATED_WORD = re.compile(rf"\b(\w+)\b(?:[\s,]+\1\b){{{WORD_REPEATS - 1},}}", re.IGNORECASE)
# A character repeated, optionally separated by blanks: "tttt", ", , , ,", "' ' '".
_REPEATED_CHAR = re.compile(rf"(\S)(?:\s*\1){{{CHAR_REPEATS - 1},}}")
# "&nbsp;&nbsp;" runs, which the released code also drops.
_NBSP_RUN = re.compile(r"(?:&nbsp;){2,}")


def exclusion_reason(text: str) -> str | None:
    """The reason code why `text` is degenerate, or None if it is a usable sentence.

    `text` is one candidate sentence as generated; leading and trailing
    whitespace does not count towards its length.
    """
    stripped = text.strip()
    if len(stripped) < MIN_CHARS:
        return TOO_SHORT
    if text.count("\n") > MAX_NEWLINES:
        return TOO_MANY_NEWLINES
    if _NON_LATIN.search(stripped):
        return NON_LATIN
    if _EMOJI.search(stripped):
        return EMOJI
    if _REPEATED_WORD.search(stripped):
        return REPEATED_WORD
    if _REPEATED_CHAR.search(stripped) or _NBSP_RUN.search(stripped):
        return REPEATED_CHAR
    return None


RuleSet = Literal["csr", "reference-code"]
RULE_SETS: tuple[str, ...] = get_args(RuleSet)

# The released code's `clean_text` whitelist (note its range `"-(`).
_RELEASED_CLEAN = re.compile(r"[^\w\s.,?!;:\'\"-()/\[\]{}+$€£*=/><==!%°^™©®♫♪π√]+")
_RELEASED_SPECIAL = re.compile(
    "[\u3130-\u318f\uac00-\ud7af]"  # Korean
    "|[\U0001f600-\U0001f64f\U0001f300-\U0001f5ff\U0001f680-\U0001f6ff\U0001f700-\U0001f77f]"
    "|[\u0400-\u04ff]"  # Cyrillic
    "|[\u3040-\u309f\u30a0-\u30ff]"  # Japanese kana
    "|(?:&nbsp;){2,}"
)
_RELEASED_REPEATED_WORD = re.compile(r"(\b\w+\b)(?:\s+\1){5,}")
_RELEASED_REPEATED_CHAR = re.compile(r"(.)" + r"\s*\1" * 10)
_RELEASED_RUNS = ("ttttttttttt", "sssssssssss", ", , , , , , , , , , , , ,", "'" * 10)


def released_exclusion_reason(text: str) -> str | None:
    """The released code's rules (`clean_tree` and `score.py`'s length check),
    on what its `extract_new_text` returns: `clean_text(new_text.strip())`.
    Too short is `len(...) < 4` of exactly that, so the blanks `clean_text`
    leaves where it deleted characters count."""
    cleaned = _RELEASED_CLEAN.sub("", text.strip())
    if len(cleaned) < MIN_CHARS:
        return TOO_SHORT
    if _RELEASED_SPECIAL.search(cleaned):
        return NON_LATIN
    if _RELEASED_REPEATED_WORD.search(cleaned):
        return REPEATED_WORD
    if _RELEASED_REPEATED_CHAR.search(cleaned) or any(run in cleaned for run in _RELEASED_RUNS):
        return REPEATED_CHAR
    if cleaned.count("\n") > MAX_NEWLINES:
        return TOO_MANY_NEWLINES
    return None


def reason_for(rules: str, text: str) -> str | None:
    """The exclusion reason of `text` under the named rule set."""
    if rules == "csr":
        return exclusion_reason(text)
    if rules == "reference-code":
        return released_exclusion_reason(text)
    raise ValueError(f"unknown degenerate rule set {rules!r}; choose one of {', '.join(RULE_SETS)}")
