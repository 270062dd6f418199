"""Opaque identifiers: a short type prefix and 128 random bits, base32.

Nothing about the order, count or time of creation can be read from them.
"""

from __future__ import annotations

import base64
import re
import secrets

_ID_RE = re.compile(r"^[a-z]{1,5}_[a-z2-7]{26}$")


def new_id(prefix: str) -> str:
    return f"{prefix}_{base64.b32encode(secrets.token_bytes(16)).decode().rstrip('=').lower()}"


def looks_like_id(value: str, prefix: str) -> bool:
    return value.startswith(prefix + "_") and _ID_RE.match(value) is not None
