"""Opaque identifiers: a short type prefix and 128 random bits, base32.

Nothing about the order, count or time of creation can be read from them.
"""

from __future__ import annotations

import re
import secrets

_ID_RE = re.compile(r"[a-z]{1,5}_[a-z2-7]{26}")
_ALPHABET = "abcdefghijklmnopqrstuvwxyz234567"  # RFC 4648 base32, lower case
_PAIRS = [_ALPHABET[i >> 5] + _ALPHABET[i & 31] for i in range(1024)]  # two characters per 10 bits


def random_b32(nbytes: int) -> str:
    """`nbytes` random bytes as unpadded lower-case base32 (what b32encode gives, at a third
    of its cost: one is made on every purchase). For sizes with an even number of characters."""
    chars = -(-nbytes * 8 // 5)
    assert chars % 2 == 0, "an odd number of characters"
    n = int.from_bytes(secrets.token_bytes(nbytes), "big") << (chars * 5 - nbytes * 8)
    return "".join([_PAIRS[(n >> shift) & 1023] for shift in range(chars * 5 - 10, -1, -10)])


def new_id(prefix: str) -> str:
    return f"{prefix}_{random_b32(16)}"


def looks_like_id(value: str, prefix: str) -> bool:
    return value.startswith(prefix + "_") and _ID_RE.fullmatch(value) is not None  # no trailing newline
