"""Cleaning user text: trimmed, with control and format characters removed.

Text is stored as given otherwise (HTML included) and rendered as text by
the pages; nothing here escapes HTML.
"""

from __future__ import annotations

import unicodedata

# Letters and symbols that print as nothing (Hangul fillers, the blank Braille pattern, Khmer's
# inherent vowels): a name of them looks blank, so they count as spaces.
_BLANKS = frozenset("\u115f\u1160\u17b4\u17b5\u2800\u3164\uffa0")


def clean(text: str) -> str:
    kept = []
    for ch in text:
        cat = unicodedata.category(ch)
        # Cc: control characters; Cf: invisible format characters (bidi overrides,
        # zero-width joiners used to dodge word filters); Cs: lone surrogates.
        if cat in ("Cc", "Cf", "Cs"):
            kept.append(" " if ch in "\t\n\r" else "")
            continue
        kept.append(" " if ch in _BLANKS else ch)
    return " ".join("".join(kept).split())


# Default-ignorable code points that are not format characters (clean() drops those): variation
# selectors, Mongolian free variation selectors, the combining grapheme joiner, tag characters.
_IGNORABLE = ((0x034F, 0x034F), (0x180B, 0x180D), (0xFE00, 0xFE0F), (0xE0000, 0xE0FFF))


def visible(text: str) -> bool:
    """Whether cleaned text shows anything: a character that is not a space, a combining mark
    alone or a default-ignorable one (a name of those prints as nothing)."""
    for ch in text:
        cp = ord(ch)
        if unicodedata.category(ch) in ("Zs", "Mn", "Me") or any(lo <= cp <= hi for lo, hi in _IGNORABLE):
            continue
        return True
    return False


def folded(text: str) -> str:
    """Text as word filters compare it: full-width and other compatibility forms as their plain
    letters (NFKC), and case folded."""
    return unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", text).casefold())
