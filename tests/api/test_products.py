"""A host's products: create, list, read and edit, with ownership and validation."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import httpx
import pytest

from server.ids import new_id
from tests.postgres import on_both_databases
from tests.support import Actor, ServerProcess, assert_error, create_product, register

# Every test here that uses a server runs on SQLite, then on PostgreSQL.
server = on_both_databases()

VALID = {"name": "Tea", "price_cents": 1999, "commission_rate_bp": 2000}


async def test_create_product_returns_it_with_defaults(api: httpx.AsyncClient, host: Actor) -> None:
    r = await api.post("/api/products", json=VALID, headers=host.auth)
    assert r.status_code == 201, r.text
    p = r.json()
    assert set(p) == {"id", "host_id", "name", "description", "image_url", "price_cents", "commission_rate_bp",
                      "created_at", "updated_at"}
    assert p["id"].startswith("prd_")
    assert p["host_id"] == host.user_id
    assert (p["name"], p["price_cents"], p["commission_rate_bp"]) == ("Tea", 1999, 2000)
    assert p["description"] == ""
    assert p["image_url"] is None
    datetime.fromisoformat(p["created_at"].replace("Z", "+00:00"))
    assert p["updated_at"] >= p["created_at"]


@pytest.mark.parametrize("image_url", ["https://cdn.example/tea.png", "http://cdn.example/a?b=c#d",
                                       "/static/demo/tea.svg"])
async def test_create_product_with_all_fields(api: httpx.AsyncClient, host: Actor, image_url: str) -> None:
    body = {"name": "  Jasmine\u200b tea ", "price_cents": 1, "commission_rate_bp": 9_500,
            "description": "<b>Spring</b>\nharvest", "image_url": image_url}
    p = await create_product(api, host, **body)
    assert p["name"] == "Jasmine tea"
    assert p["description"] == "<b>Spring</b>\nharvest"
    assert p["image_url"] == image_url
    assert (p["price_cents"], p["commission_rate_bp"]) == (1, 9_500)
    assert (await api.get(f"/api/products/{p['id']}")).json() == p


async def test_commission_bounds_are_inclusive(api: httpx.AsyncClient, host: Actor) -> None:
    assert (await create_product(api, host, commission_rate_bp=0))["commission_rate_bp"] == 0
    # The top: all that the platform's fee (5% here) leaves of a sale.
    assert (await create_product(api, host, commission_rate_bp=9500))["commission_rate_bp"] == 9500
    assert (await create_product(api, host, price_cents=100_000_000))["price_cents"] == 100_000_000


async def test_viewer_cannot_create_products(api: httpx.AsyncClient, viewer: Actor) -> None:
    assert_error(await api.post("/api/products", json=VALID, headers=viewer.auth), 403, "host_only")


async def test_anonymous_cannot_create_products(api: httpx.AsyncClient) -> None:
    assert_error(await api.post("/api/products", json=VALID), 401, "unauthorized")


@pytest.mark.parametrize(("change", "field"), [
    ({"price_cents": 19.99}, "price_cents"),
    ({"price_cents": 20.5e9}, "price_cents"),  # whole, but past the maximum (20.0 is 20: test_schema.py)
    ({"price_cents": "1999"}, "price_cents"),
    ({"price_cents": True}, "price_cents"),
    ({"price_cents": None}, "price_cents"),
    ({"price_cents": 0}, "price_cents"),
    ({"price_cents": -100}, "price_cents"),
    ({"price_cents": 100_000_001}, "price_cents"),
    ({"price_cents": 10 ** 30}, "price_cents"),
    ({"commission_rate_bp": 10_001}, "commission_rate_bp"),
    ({"commission_rate_bp": 9_501}, "commission_rate_bp"),  # with the platform's 5% fee, over the sale
    ({"commission_rate_bp": -1}, "commission_rate_bp"),
    ({"commission_rate_bp": 12.5}, "commission_rate_bp"),
    ({"commission_rate_bp": "2000"}, "commission_rate_bp"),
    ({"name": ""}, "name"),
    ({"name": "   "}, "name"),
    ({"name": "\u0000\u200b"}, "name"),
    ({"name": "x" * 121}, "name"),
    ({"name": 5}, "name"),
    ({"description": "d" * 2001}, "description"),
    ({"description": None}, "description"),
    ({"description": "tea\u0000"}, "description"),  # PostgreSQL text holds no NUL
    ({"image_url": "javascript:alert(1)"}, "image_url"),
    ({"image_url": "JavaScript:alert(1)//http://x"}, "image_url"),
    ({"image_url": "/\\evil.example/x.png"}, "image_url"),  # browsers read /\ as //
    ({"image_url": "/static/tea\u0000.png"}, "image_url"),
    ({"image_url": "data:image/svg+xml;base64,PHN2Zz4="}, "image_url"),
    ({"image_url": "//evil.example/x.png"}, "image_url"),
    ({"image_url": "ftp://files.example/x.png"}, "image_url"),
    ({"image_url": "http://"}, "image_url"),
    ({"image_url": "https://cdn.example/a b.png"}, "image_url"),
    ({"image_url": "tea.png"}, "image_url"),
    ({"image_url": "/"}, "image_url"),
    ({"image_url": "https://x.example/" + "a" * 2048}, "image_url"),
    ({"host_id": "usr_aaaaaaaaaaaaaaaaaaaaaaaaaa"}, "host_id"),
    ({"id": "prd_aaaaaaaaaaaaaaaaaaaaaaaaaa"}, "id"),
])
async def test_create_product_validation(api: httpx.AsyncClient, host: Actor, change: dict[str, Any],
                                         field: str) -> None:
    r = await api.post("/api/products", json={**VALID, **change}, headers=host.auth)
    assert_error(r, 422, "invalid", field)


@pytest.mark.parametrize("missing", ["name", "price_cents", "commission_rate_bp"])
async def test_create_product_requires_fields(api: httpx.AsyncClient, host: Actor, missing: str) -> None:
    body = {k: v for k, v in VALID.items() if k != missing}
    assert_error(await api.post("/api/products", json=body, headers=host.auth), 422, "invalid", missing)


async def test_list_shows_only_the_callers_products_newest_first(api: httpx.AsyncClient, host: Actor,
                                                                  other_host: Actor) -> None:
    mine = [await create_product(api, host, name=f"Mine {i}") for i in range(3)]
    theirs = await create_product(api, other_host, name="Theirs")

    r = await api.get("/api/products", headers=host.auth)
    assert r.status_code == 200
    listed = r.json()
    assert all(p["host_id"] == host.user_id for p in listed)
    ids = [p["id"] for p in listed]
    assert theirs["id"] not in ids
    assert [i for i in ids if i in {p["id"] for p in mine}] == [p["id"] for p in reversed(mine)]
    assert [p["created_at"] for p in listed] == sorted((p["created_at"] for p in listed), reverse=True)

    their_list = (await api.get("/api/products", headers=other_host.auth)).json()
    assert theirs["id"] in [p["id"] for p in their_list]
    assert not {p["id"] for p in mine} & {p["id"] for p in their_list}


async def test_new_host_has_no_products(api: httpx.AsyncClient, server: ServerProcess) -> None:
    fresh = await register(api, "host")
    r = await api.get("/api/products", headers=fresh.auth)
    assert r.status_code == 200
    assert r.json() == []


async def test_list_is_for_hosts_only(api: httpx.AsyncClient, viewer: Actor) -> None:
    assert_error(await api.get("/api/products", headers=viewer.auth), 403, "host_only")
    assert_error(await api.get("/api/products"), 401, "unauthorized")


async def test_read_product_is_public(api: httpx.AsyncClient, host: Actor, viewer: Actor) -> None:
    p = await create_product(api, host, description="For everyone")
    r = await api.get(f"/api/products/{p['id']}")
    assert r.status_code == 200
    assert r.json() == p
    assert (await api.get(f"/api/products/{p['id']}", headers=viewer.auth)).json() == p


@pytest.mark.parametrize("product_id", [new_id("prd"), "nope", "prd_", new_id("room"), new_id("prd").upper(),
                                        new_id("prd") + "a", "prd_" + "1" * 26, "%00", "..%2f..%2fetc"])
async def test_unknown_or_malformed_product_is_404(api: httpx.AsyncClient, host: Actor,
                                                   product_id: str) -> None:
    assert_error(await api.get(f"/api/products/{product_id}"), 404)
    r = await api.patch(f"/api/products/{product_id}", json={"name": "x"}, headers=host.auth)
    assert_error(r, 404)


async def test_known_format_unknown_product_says_product_not_found(api: httpx.AsyncClient) -> None:
    assert_error(await api.get(f"/api/products/{new_id('prd')}"), 404, "product_not_found")


async def test_owner_edits_fields(api: httpx.AsyncClient, host: Actor) -> None:
    p = await create_product(api, host, image_url="/static/a.png", description="old")
    change = {"name": " Oolong ", "price_cents": 2500, "commission_rate_bp": 1500, "description": "new",
              "image_url": "https://cdn.example/oolong.png"}
    r = await api.patch(f"/api/products/{p['id']}", json=change, headers=host.auth)
    assert r.status_code == 200, r.text
    edited = r.json()
    assert {k: edited[k] for k in change} == {**change, "name": "Oolong"}
    assert (edited["id"], edited["host_id"], edited["created_at"]) == (p["id"], p["host_id"], p["created_at"])
    assert edited["updated_at"] >= p["updated_at"]
    assert (await api.get(f"/api/products/{p['id']}")).json() == edited


async def test_partial_edit_keeps_other_fields(api: httpx.AsyncClient, host: Actor) -> None:
    p = await create_product(api, host, image_url="/static/a.png", description="keep me")
    r = await api.patch(f"/api/products/{p['id']}", json={"price_cents": 999}, headers=host.auth)
    assert r.status_code == 200, r.text
    edited = r.json()
    assert edited["price_cents"] == 999
    assert {k: edited[k] for k in ("name", "description", "image_url", "commission_rate_bp")} == \
           {k: p[k] for k in ("name", "description", "image_url", "commission_rate_bp")}

    r = await api.patch(f"/api/products/{p['id']}", json={"image_url": None}, headers=host.auth)
    assert r.json()["image_url"] is None
    r = await api.patch(f"/api/products/{p['id']}", json={}, headers=host.auth)
    assert r.status_code == 200
    assert r.json()["price_cents"] == 999
    assert r.json()["image_url"] is None


@pytest.mark.parametrize(("change", "field"), [
    ({"price_cents": 0}, "price_cents"),
    ({"price_cents": 10.5}, "price_cents"),
    ({"price_cents": None}, "price_cents"),
    ({"commission_rate_bp": 10_001}, "commission_rate_bp"),
    ({"commission_rate_bp": 9_501}, "commission_rate_bp"),
    ({"name": "  "}, "name"),
    ({"name": None}, "name"),
    ({"description": None}, "description"),
    ({"image_url": "javascript:alert(1)"}, "image_url"),
    ({"host_id": "usr_aaaaaaaaaaaaaaaaaaaaaaaaaa"}, "host_id"),
    ({"created_at": "2020-01-01T00:00:00Z"}, "created_at"),
])
async def test_edit_validation(api: httpx.AsyncClient, host: Actor, change: dict[str, Any],
                               field: str) -> None:
    p = await create_product(api, host)
    r = await api.patch(f"/api/products/{p['id']}", json=change, headers=host.auth)
    assert_error(r, 422, "invalid", field)
    assert (await api.get(f"/api/products/{p['id']}")).json() == p


async def test_only_the_owner_edits(api: httpx.AsyncClient, host: Actor, other_host: Actor,
                                   viewer: Actor) -> None:
    p = await create_product(api, host)
    url = f"/api/products/{p['id']}"
    assert_error(await api.patch(url, json={"price_cents": 1}, headers=other_host.auth), 403, "not_owner")
    assert_error(await api.patch(url, json={"price_cents": 1}, headers=viewer.auth), 403, "host_only")
    assert_error(await api.patch(url, json={"price_cents": 1}), 401, "unauthorized")
    assert (await api.get(url)).json() == p
