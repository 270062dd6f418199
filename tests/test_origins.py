"""Unit tests for untrusted-input helpers: server.origins (exact origin matching) and server.text.clean."""

from __future__ import annotations

import pytest

from server.origins import normalize, origin_allowed, own_origin
from server.text import clean

OWN = "http://127.0.0.1:8000"
ALLOWED = ("https://app.example.com", "HTTP://Localhost:3000/")


@pytest.mark.parametrize(("raw", "expected"), [
    ("http://example.com", "http://example.com"),
    ("HTTPS://Example.COM", "https://example.com"),
    ("https://example.com:443", "https://example.com"),
    ("http://example.com:80", "http://example.com"),
    ("http://example.com:443", "http://example.com:443"),
    ("https://example.com:80", "https://example.com:80"),
    ("http://example.com/", "http://example.com"),
    ("  http://example.com  ", "http://example.com"),
    ("http://127.0.0.1:8000", "http://127.0.0.1:8000"),
    ("http://[::1]:8000", "http://[::1]:8000"),
    ("http://[::1]:80", "http://[::1]"),
])
def test_normalize(raw: str, expected: str) -> None:
    assert normalize(raw) == expected


@pytest.mark.parametrize("raw", [
    "null", "", "example.com", "//example.com", "ftp://example.com", "javascript:alert(1)", "file:///etc/passwd",
    "http://", "http://example.com/path", "http://example.com?q=1", "http://example.com#f",
    "http://user@example.com", "http://user:pw@example.com", "http://example.com:99999", "http://example.com:port",
    "ws://example.com",
])
def test_normalize_refuses_what_is_not_an_origin(raw: str) -> None:
    assert normalize(raw) is None


@pytest.mark.parametrize("origin", [OWN, "http://127.0.0.1:8000/", "HTTP://127.0.0.1:8000", "https://app.example.com",
                                    "https://APP.example.com:443", "http://localhost:3000"])
def test_allowed_origins(origin: str) -> None:
    assert origin_allowed(origin, OWN, ALLOWED)


@pytest.mark.parametrize("origin", [
    "null", "http://evil.example", "https://app.example.com.evil.io", "https://evil.io/app.example.com",
    "https://app.example.com@evil.io", "https://evilapp.example.com", "https://sub.app.example.com",
    "http://app.example.com", "https://app.example.com:8443", "http://127.0.0.1", "http://127.0.0.1:8001",
    "https://127.0.0.1:8000", "http://localhost:8000", "http://localhost:3001", "http://127.0.0.1:8000.evil.io",
    "", "*",
])
def test_refused_origins(origin: str) -> None:
    assert not origin_allowed(origin, OWN, ALLOWED)


def test_nothing_is_allowed_without_an_own_origin() -> None:
    assert not origin_allowed("http://evil.example", "", ())
    assert not origin_allowed("", "", ())


def test_allowed_entries_that_are_not_origins_match_nothing() -> None:
    assert not origin_allowed("null", OWN, ("null",))
    assert not origin_allowed("https://app.example.com", OWN, ("*",))
    assert not origin_allowed("https://app.example.com", OWN, ("https://*.example.com",))


@pytest.mark.parametrize(("scheme", "host", "expected"), [
    ("http", "127.0.0.1:8000", "http://127.0.0.1:8000"),
    ("https", "Shop.Example.com", "https://shop.example.com"),
    ("https", "shop.example.com:443", "https://shop.example.com"),
    ("ws", "127.0.0.1:8000", "http://127.0.0.1:8000"),
    ("wss", "shop.example.com", "https://shop.example.com"),
])
def test_own_origin(scheme: str, host: str, expected: str) -> None:
    assert own_origin(scheme, {"host": host}) == expected


def test_own_origin_without_a_usable_host_is_empty() -> None:
    assert own_origin("http", {}) == ""
    assert own_origin("http", {"host": "a@b"}) == ""


@pytest.mark.parametrize(("raw", "expected"), [
    ("hello", "hello"),
    ("  padded  ", "padded"),
    ("many   inner \t spaces", "many inner spaces"),
    ("line\nbreaks\r\nand\ttabs", "line breaks and tabs"),
    ("nul\x00byte", "nulbyte"),
    ("bell\x07 and esc\x1b[31m", "bell and esc[31m"),
    ("del\x7f", "del"),
    ("c1\x85\x9f", "c1"),
    ("zero\u200bwidth", "zerowidth"),
    ("bidi \u202eevil\u202c", "bidi evil"),
    ("bom\ufeff", "bom"),
    ("soft\u00adhyphen", "softhyphen"),
    ("lone \ud800 surrogate", "lone surrogate"),
    ("<b>html</b> & 'quotes'", "<b>html</b> & 'quotes'"),
    ("emoji 🍵 and 中文", "emoji 🍵 and 中文"),
    ("nbsp\u00a0between", "nbsp between"),
    ("", ""),
    ("   ", ""),
    ("\x00\x01\u200e", ""),
])
def test_clean(raw: str, expected: str) -> None:
    assert clean(raw) == expected


def test_clean_is_idempotent() -> None:
    raw = " a\u200b\tb \x00 c\n"
    assert clean(clean(raw)) == clean(raw) == "a b c"
