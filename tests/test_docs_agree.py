"""A figure the docs repeat has one value wherever it appears.

Each fact below has its one value and the phrasings README.md, DEVELOPERS.md
and docs/*.md use for it (a regular expression whose first group is the
figure). Every match must carry the value, and every fact must be found at
least once, so a rephrased sentence cannot slip out of the check unnoticed.
Where the value is the code's own (a default), it is read from the code.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
PAGES = [ROOT / "README.md", ROOT / "DEVELOPERS.md", *sorted((ROOT / "docs").glob("*.md"))]


def _demo_default(name: str) -> str:
    from csr.cli.demo_cmds import demo

    default = inspect.signature(demo).parameters[name].default.default
    return f"{default:,}"


FACTS: dict[str, tuple[str | callable, list[str]]] = {
    "records in the authors' prompt file": (
        "12,856",
        [r"authors' prompt file of ([\d,]+) records", r"([\d,]+)-record prompt file", r"authors' (\d+k)-prompt file",
         r"the ([\d,]+) prompts in 15 to 30 minutes", r"per iteration of ([\d,]+) prompts"],
    ),
    "parameters of LLaVA-1.5-7B": ("7.06 B", [r"weights [\d.]+ GB \(([\d.]+ B) parameters"]),
    "a merged 7B version in float32": ("28 GB", [r"7B version(?: is|:) (\d+ GB) in float32"]),
    "a merged 7B version in bfloat16": ("14 GB", [r"in float32[^.;]*?[,;] (\d+(?:\.\d+)? GB) in bfloat16"]),
    "held-out images of csr demo": (
        lambda: _demo_default("heldout"),
        [r"on ([\d,]+) held-out images\b(?! give)", r"`csr demo` now measures every version with CHAIR and POPE on ([\d,]+)"],
    ),
    "prompts of csr demo": (lambda: _demo_default("prompts"), [r"\bimports ([\d,]+) prompts, runs"]),
}


def _matches(pattern: str) -> list[tuple[str, str]]:
    found = []
    for page in PAGES:
        text = " ".join(page.read_text().split())  # sentences wrap across lines
        found += [(page.relative_to(ROOT).as_posix(), m.group(1)) for m in re.finditer(pattern, text)]
    return found


@pytest.mark.parametrize("fact", sorted(FACTS))
def test_a_repeated_figure_has_one_value(fact):
    value, patterns = FACTS[fact]
    value = value() if callable(value) else value
    found = [hit for pattern in patterns for hit in _matches(pattern)]
    assert found, f"no page states {fact} any more: update the patterns in this test"
    wrong = [f"{page}: {figure}" for page, figure in found if figure != value]
    assert not wrong, f"{fact} is {value}, but the docs say otherwise: {wrong}"
