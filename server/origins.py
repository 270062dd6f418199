"""Origin checks for WebSocket handshakes and cookie-authenticated writes.

Matching is exact on scheme, host and port: no prefixes, no suffixes, no
wildcards, so `null`, `evil.example` and `app.example.com.evil.io` never pass.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Mapping
from urllib.parse import urlsplit

_DEFAULT_PORTS = {"http": 80, "https": 443}


@lru_cache(maxsize=256)
def normalize(origin: str) -> str | None:
    """'HTTPS://Example.com:443' -> 'https://example.com'; None if it is not an origin."""
    try:
        parts = urlsplit(origin.strip())
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    host = parts.hostname
    if scheme not in _DEFAULT_PORTS or not host or parts.username or parts.password:
        return None
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        return None
    if ":" in host:
        host = f"[{host}]"
    suffix = "" if port is None or port == _DEFAULT_PORTS[scheme] else f":{port}"
    return f"{scheme}://{host}{suffix}"


def own_origin(scheme: str, headers: Mapping[str, str]) -> str:
    """The origin the request was addressed to, from its scheme and Host header."""
    scheme = {"ws": "http", "wss": "https"}.get(scheme, scheme)
    return normalize(f"{scheme}://{headers.get('host', '')}") or ""


def origin_allowed(origin: str, own: str, allowed: tuple[str, ...]) -> bool:
    candidate = normalize(origin)
    if candidate is None:
        return False
    return candidate == own or any(candidate == normalize(a) for a in allowed)
