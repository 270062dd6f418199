"""server.ids: opaque ids are random base32, the same text `base64.b32encode` would give."""

from __future__ import annotations

import base64
import secrets

import pytest

from server import clock, ids
from server.inventory.stock import new_order_id, sale_of


@pytest.mark.parametrize("nbytes", [10, 16])
def test_random_b32_is_b32encode_of_the_random_bytes(monkeypatch: pytest.MonkeyPatch, nbytes: int) -> None:
    cases = [b"\x00" * nbytes, b"\xff" * nbytes] + [secrets.token_bytes(nbytes) for _ in range(500)]
    for raw in cases:
        monkeypatch.setattr(ids.secrets, "token_bytes", lambda n, raw=raw: raw)
        assert ids.random_b32(nbytes) == base64.b32encode(raw).decode().rstrip("=").lower()


def test_ids_are_well_formed_and_distinct() -> None:
    made = [ids.new_id("sale") for _ in range(2000)]
    assert len(set(made)) == len(made)
    assert all(ids.looks_like_id(i, "sale") for i in made)
    assert not any(ids.looks_like_id(i + suffix, "sale") for i in made[:5] for suffix in ("\n", " ", "x"))
    orders = [new_order_id(s) for s in made]
    assert [sale_of(o) for o in orders] == made  # an order id names its sale


def test_iso_ms_matches_the_datetime_formatting() -> None:
    for ms in [0, 1, 999, 1_000, 1_764_000_000_123, 1_764_000_000_999, 4_102_444_799_999]:
        assert clock.iso_ms(ms) == clock.iso(clock.from_ms(ms)), ms
