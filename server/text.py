"""Cleaning user text: trimmed, with control and format characters removed.

Text is stored as given otherwise (HTML included) and rendered as text by
the pages; nothing here escapes HTML.
"""

from __future__ import annotations

import unicodedata


def clean(text: str) -> str:
    kept = []
    for ch in text:
        cat = unicodedata.category(ch)
        # Cc: control characters; Cf: invisible format characters (bidi overrides,
        # zero-width joiners used to dodge word filters); Cs: lone surrogates.
        if cat in ("Cc", "Cf", "Cs"):
            kept.append(" " if ch in "\t\n\r" else "")
            continue
        kept.append(ch)
    return " ".join("".join(kept).split())
