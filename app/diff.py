"""Word-level diff of two outputs, as the (text, category) segments gr.HighlightedText shows."""

from __future__ import annotations

import re
from difflib import SequenceMatcher

REMOVED, ADDED = "-", "+"


def word_diff(old: str, new: str) -> list[tuple[str, str | None]]:
    """Segments in reading order: (text, None) in both, (text, "-") only in `old`, (text, "+") only
    in `new`. Words, runs of whitespace and single punctuation marks are the units, so a changed
    word shows as one replacement instead of scattered letters."""
    a, b = _units(old), _units(new)
    segments: list[tuple[str, str | None]] = []
    for op, i1, i2, j1, j2 in SequenceMatcher(a=a, b=b, autojunk=False).get_opcodes():
        if op == "equal":
            segments.append(("".join(a[i1:i2]), None))
            continue
        if i2 > i1:
            segments.append(("".join(a[i1:i2]), REMOVED))
        if j2 > j1:
            segments.append(("".join(b[j1:j2]), ADDED))
    return segments


def _units(text: str) -> list[str]:
    return re.findall(r"\s+|\w+|[^\w\s]", text)
