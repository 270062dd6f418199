"""Orders: idempotent purchases under concurrent retries, expiry by the sweeper, and the race of
paying against expiring. Over HTTP against the shared real server, and in-process against real
Redis through `Stock` where the test needs more than the per-buyer rate limit allows."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

import httpx
import pytest

from server.inventory.records import OrderRecord
from tests.inventory.support import (
    PERSIST_TIMEOUT_S,
    Shop,
    World,
    assert_balanced,
    bought,
    buy,
    buy_unlimited,
    error_of,
    get_order,
    get_sale,
    idem_key,
    launch,
    new_shop,
    pay,
    sale_state,
    settle_tracked,
    sql_orders,
    stream_records,
    wait_persisted,
)
from tests.support import Actor, ServerProcess, api_client, backends, eventually, guest, guests, register


@pytest.fixture(autouse=True)
async def _settle(server: ServerProcess) -> AsyncIterator[None]:
    yield
    await settle_tracked(server.url)


@pytest.fixture
async def api(server: ServerProcess) -> AsyncIterator[httpx.AsyncClient]:
    async with api_client(server.url) as c:
        yield c


@pytest.fixture(scope="module")
async def host(server: ServerProcess) -> Actor:
    async with api_client(server.url) as c:
        return await register(c, "host")


@pytest.fixture
async def shop(api: httpx.AsyncClient, host: Actor) -> Shop:
    return await new_shop(api, host=host)


@pytest.fixture
async def world(redis_url: str, sql_url: str) -> AsyncIterator[World]:
    """On SQLite, then on PostgreSQL."""
    async with World.open(redis_url, sql_url) as w:
        yield w


def iso_ms(value: str) -> int:
    return int(datetime.fromisoformat(value).timestamp() * 1000)


# --- idempotency ------------------------------------------------------------------------------

async def test_concurrent_retries_of_one_key_make_one_order(api: httpx.AsyncClient, shop: Shop) -> None:
    sale = await launch(api, shop, stock=10, per_user_limit=5)
    buyer = await guest(api, "buyer")
    key = idem_key("same")
    answers = await asyncio.gather(*(buy(api, buyer, sale["id"], key) for _ in range(50)))

    created = [r for r in answers if r.status_code == 201]
    again = [r for r in answers if r.status_code == 200]
    limited = [r for r in answers if r.status_code == 429]
    # The per-buyer purchase limit (5/s, burst 10) turns some of the 50 away before the stock is
    # touched; every attempt it lets through is the same order.
    assert len(created) + len(again) + len(limited) == 50, [r.text for r in answers]
    assert len(created) == 1, [r.text for r in answers]
    order_id = created[0].json()["order_id"]
    assert {r.json()["order_id"] for r in again} == {order_id}
    assert all(error_of(r) == "rate_limited" and int(r.headers["retry-after"]) >= 1 for r in limited)
    assert len(again) >= 1
    s = await get_sale(api, sale["id"])
    assert (s["remaining"], s["reserved"]) == (9, 1)

    # Once the limiter lets the buyer through again, the same key still answers the same order.
    r = await buy_unlimited(api, buyer, sale["id"], key)
    assert r.status_code == 200 and r.json()["order_id"] == order_id and r.json()["remaining"] == 9, r.text
    # Same key, other quantity: refused, and nothing taken.
    r = await buy_unlimited(api, buyer, sale["id"], key, quantity=2)
    assert r.status_code == 422 and error_of(r) == "key_reused" and r.json()["field"] == "Idempotency-Key", r.text
    assert (await get_sale(api, sale["id"]))["remaining"] == 9


async def test_fifty_concurrent_reserves_with_one_key_in_process(world: World) -> None:
    """The script itself, without the HTTP rate limit in front: 50 at once, one order."""
    sale = await world.add_sale(stock=10, limit=5)
    (buyer,) = await world.add_users(1)
    key = idem_key()
    outcomes = await asyncio.gather(*(world.reserve(sale.sale_id, buyer, key) for _ in range(50)))
    statuses = sorted(o.status for o in outcomes)
    assert statuses == ["duplicate"] * 49 + ["reserved"], statuses
    assert len({o.order.id for o in outcomes if o.order}) == 1
    state = await world.stock.state(sale.sale_id)
    assert state is not None and (state.remaining, state.reserved) == (9, 1)
    assert len(await world.stock.orders(sale.sale_id)) == 1
    assert int(await world.redis.hget(f"{{sale:{sale.sale_id}}}:buyers", buyer) or 0) == 1


async def test_keys_are_per_buyer_and_per_sale(api: httpx.AsyncClient, shop: Shop, host: Actor) -> None:
    sale = await launch(api, shop, stock=10, per_user_limit=2)
    other_room = await new_shop(api, host=host)
    other_sale = await launch(api, other_room, stock=10, per_user_limit=2)
    a, b = await guest(api, "buyer"), await guest(api, "buyer")
    key = idem_key("shared")
    ra, rb = await asyncio.gather(buy(api, a, sale["id"], key), buy(api, b, sale["id"], key))
    assert (ra.status_code, rb.status_code) == (201, 201), (ra.text, rb.text)
    assert ra.json()["order_id"] != rb.json()["order_id"]
    rc = await buy(api, a, other_sale["id"], key)
    assert rc.status_code == 201 and rc.json()["order_id"] not in (ra.json()["order_id"], rb.json()["order_id"])
    assert (await get_sale(api, sale["id"]))["remaining"] == 8
    assert (await get_sale(api, other_sale["id"]))["remaining"] == 9


async def test_missing_key_is_400(api: httpx.AsyncClient, shop: Shop) -> None:
    sale = await launch(api, shop)
    buyer = await guest(api, "buyer")
    r = await api.post(f"/api/sales/{sale['id']}/purchase", json={"quantity": 1}, headers=buyer.auth)
    assert r.status_code == 400 and error_of(r) == "idempotency_key_required", r.text
    assert (await get_sale(api, sale["id"]))["remaining"] == sale["stock"]


async def test_retry_after_sold_out_returns_the_order(api: httpx.AsyncClient, shop: Shop) -> None:
    sale = await launch(api, shop, stock=1, per_user_limit=1)
    a, b = await guest(api, "buyer"), await guest(api, "buyer")
    key = idem_key()
    first = await buy(api, a, sale["id"], key)
    assert first.status_code == 201, first.text
    assert error_of(await buy(api, b, sale["id"])) == "sold_out"
    again = await buy(api, a, sale["id"], key)
    assert again.status_code == 200 and again.json()["order_id"] == first.json()["order_id"], again.text
    assert again.json()["remaining"] == 0


async def test_longest_key_is_kept_exactly(api: httpx.AsyncClient, server: ServerProcess, shop: Shop) -> None:
    sale = await launch(api, shop, stock=2, per_user_limit=2)
    buyer = await guest(api, "buyer")
    key = ("k:!~ " * 26)[:127] + "z"  # 128 printable characters, a colon and spaces inside
    assert len(key) == 128
    first = await buy(api, buyer, sale["id"], key)
    assert first.status_code == 201, first.text
    again = await buy(api, buyer, sale["id"], key)
    assert again.status_code == 200 and again.json()["order_id"] == first.json()["order_id"], again.text
    other = await buy(api, buyer, sale["id"], key[:-1] + "y")  # one character apart: another attempt
    assert other.status_code == 201, other.text
    async with backends(server) as (stock, db):
        report = await wait_persisted(stock, db, sale["id"])
        assert report.ok, report.lines()
        rows = await sql_orders(db, sale["id"])
        assert rows[first.json()["order_id"]].idempotency_key == key
        assert rows[other.json()["order_id"]].idempotency_key == key[:-1] + "y"


# --- expiry -----------------------------------------------------------------------------------

async def test_unpaid_order_expires_and_its_unit_sells_again(api: httpx.AsyncClient, server: ServerProcess,
                                                             shop: Shop) -> None:
    sale = await launch(api, shop, stock=1, per_user_limit=1, payment_timeout_s=1)
    a, b = await guest(api, "buyer"), await guest(api, "buyer")
    key = idem_key()
    r = await buy(api, a, sale["id"], key)
    assert r.status_code == 201, r.text
    order = r.json()
    assert iso_ms(order["pay_by"]) - iso_ms(order["created_at"]) == 1000
    assert error_of(await buy(api, b, sale["id"])) == "sold_out"

    async def released() -> dict[str, Any] | None:
        s = await get_sale(api, sale["id"])
        assert_balanced(s)
        return s if s["remaining"] == 1 else None

    s = await eventually(released, timeout=PERSIST_TIMEOUT_S, what="the sweeper releasing the unpaid order")
    assert (s["reserved"], s["paid"]) == (0, 0)
    expired = await get_order(api, a, order["order_id"])
    assert expired["status"] == "expired" and expired["released_at"] is not None
    assert iso_ms(expired["released_at"]) >= iso_ms(order["pay_by"])

    r = await pay(api, a, order["order_id"])
    assert r.status_code == 409 and error_of(r) == "expired", r.text
    r = await api.post(f"/api/orders/{order['order_id']}/cancel", headers=a.auth)
    assert r.status_code == 409 and error_of(r) == "expired", r.text
    # A retry of the old key answers the expired order: it does not buy again.
    r = await buy(api, a, sale["id"], key)
    assert r.status_code == 200 and r.json()["status"] == "expired" and r.json()["remaining"] == 1, r.text

    resold = await bought(api, b, sale["id"])
    assert resold["remaining"] == 0
    final = await get_sale(api, sale["id"])
    assert (final["remaining"], final["reserved"], final["paid"]) == (0, 1, 0)

    async with backends(server) as (stock, db):
        report = await wait_persisted(stock, db, sale["id"])
        assert report.ok, report.lines()
        rows = await sql_orders(db, sale["id"])
        assert (rows[order["order_id"]].status, rows[order["order_id"]].version) == ("expired", 2)
        assert rows[resold["order_id"]].status == "reserved"
        releases = [rec for rec in await stream_records(stock.redis, sale["id"]) if rec["status"] == "expired"]
        assert [rec["id"] for rec in releases] == [order["order_id"]]


async def test_concurrent_releases_release_once(world: World) -> None:
    sale = await world.add_sale(stock=5, limit=3, timeout_ms=1)
    (buyer,) = await world.add_users(1)
    reserved = await world.reserve(sale.sale_id, buyer, quantity=3)
    assert reserved.status == "reserved" and reserved.remaining == 2
    order = reserved.order
    assert order is not None
    await world.wait_redis_past(order.pay_by)

    outcomes = await asyncio.gather(*(world.stock.release(sale.sale_id, order.id, "expired")
                                      for _ in range(20)))
    statuses = sorted(o.status for o in outcomes)
    assert statuses == ["expired"] * 19 + ["released"], statuses
    assert [o.remaining for o in outcomes if o.status == "released"] == [5]
    state = await world.stock.state(sale.sale_id)
    assert state is not None and (state.remaining, state.reserved, state.paid) == (5, 0, 0)
    assert int(await world.redis.hget(f"{{sale:{sale.sale_id}}}:buyers", buyer) or 0) == 0
    assert await world.stock.due(sale.sale_id, 2**62) == []
    records = await stream_records(world.redis, sale.sale_id)
    assert [(r["status"], r["v"]) for r in records] == [("reserved", 1), ("expired", 2)]
    # Neither a late cancel nor a late pay moves it.
    assert (await world.stock.release(sale.sale_id, order.id, "cancelled", buyer)).status == "expired"
    assert (await world.stock.pay(sale.sale_id, order.id, buyer, "late")).status == "expired"
    assert (await sale_state(world.stock, sale.sale_id)).remaining == 5


async def test_release_before_pay_by_is_not_due(world: World) -> None:
    sale = await world.add_sale(stock=2, limit=2, timeout_ms=3_600_000)
    (buyer,) = await world.add_users(1)
    order = (await world.reserve(sale.sale_id, buyer)).order
    assert order is not None
    outcome = await world.stock.release(sale.sale_id, order.id, "expired")
    assert outcome.status == "not_due"
    assert (await sale_state(world.stock, sale.sale_id)).remaining == 1
    assert await world.stock.due(sale.sale_id, order.pay_by) == [order.id]


# --- pay against expire -----------------------------------------------------------------------

async def test_paying_at_the_deadline_races_the_sweeper(api: httpx.AsyncClient, server: ServerProcess,
                                                        shop: Shop) -> None:
    n = 40
    sale = await launch(api, shop, stock=n, per_user_limit=1, payment_timeout_s=1)
    buyers = await guests(api, n, "racer")
    orders = await asyncio.gather(*(bought(api, b, sale["id"]) for b in buyers))
    rng = random.Random(1234)

    async def pay_near_deadline(buyer: Actor, order: dict[str, Any]) -> httpx.Response:
        # pay_by is on the server's wall clock (the same machine's): sleep until just before or after it
        at_s = (iso_ms(order["pay_by"]) + rng.randint(-80, 80)) / 1000
        await asyncio.sleep(min(5.0, max(0.0, at_s - time.time())))
        return await pay(api, buyer, order["order_id"])

    samples: list[dict[str, Any]] = []
    stop = asyncio.Event()

    async def watch() -> None:
        for _ in range(500):  # bounded
            if stop.is_set():
                return
            samples.append(await get_sale(api, sale["id"]))
            await asyncio.sleep(0.02)

    watcher = asyncio.create_task(watch())
    answers = await asyncio.gather(*(pay_near_deadline(b, o) for b, o in zip(buyers, orders)))
    stop.set()
    await watcher

    paid_ids, expired_ids = set(), set()
    for order, r in zip(orders, answers):
        if r.status_code == 200:
            assert r.json()["status"] == "paid", r.text
            paid_ids.add(order["order_id"])
        else:
            assert r.status_code == 409 and error_of(r) == "expired", r.text
            expired_ids.add(order["order_id"])
    for s in samples:
        assert_balanced(s)
        assert s["paid"] <= len(paid_ids)

    async def swept() -> dict[str, Any] | None:
        s = await get_sale(api, sale["id"])
        return s if s["reserved"] == 0 else None

    final = await eventually(swept, timeout=PERSIST_TIMEOUT_S, what="every unpaid order released")
    assert_balanced(final)
    assert (final["paid"], final["remaining"]) == (len(paid_ids), n - len(paid_ids))
    for buyer, order in zip(buyers, orders):
        status = (await get_order(api, buyer, order["order_id"]))["status"]
        assert status == ("paid" if order["order_id"] in paid_ids else "expired"), order["order_id"]

    async with backends(server) as (stock, db):
        records = await stream_records(stock.redis, sale["id"])
        by_order: dict[str, list[str]] = {}
        for rec in records:
            by_order.setdefault(rec["id"], []).append(rec["status"])
        for order_id, statuses in by_order.items():
            # reserved, then exactly one of paid / expired: never both, never twice
            assert statuses in (["reserved", "paid"], ["reserved", "expired"]), (order_id, statuses)
        report = await wait_persisted(stock, db, sale["id"])
        assert report.ok, report.lines()
        rows = await sql_orders(db, sale["id"])
        assert {i for i, row in rows.items() if row.status == "paid"} == paid_ids


async def test_pay_and_expire_race_in_process(world: World) -> None:
    """Pay and several expiries fired together at orders whose pay-by is now: one side wins each."""
    n = 60
    sale = await world.add_sale(stock=n, limit=1, timeout_ms=2)
    buyers = await world.add_users(n)
    orders = []
    for b in buyers:
        o = await world.reserve(sale.sale_id, b)
        assert o.status == "reserved" and o.order is not None
        orders.append(o.order)

    async def race(buyer: str, order: OrderRecord) -> list[str]:
        outcomes = await asyncio.gather(world.stock.pay(sale.sale_id, order.id, buyer, "ref"),
                                        *(world.stock.release(sale.sale_id, order.id, "expired")
                                          for _ in range(3)))
        return [o.status for o in outcomes]

    results = await asyncio.gather(*(race(b, o) for b, o in zip(buyers, orders)))
    paid = released = 0
    for statuses in results:
        pay_status, releases = statuses[0], statuses[1:]
        if pay_status == "paid":
            paid += 1
            assert "released" not in releases, statuses
        else:
            assert pay_status == "expired", statuses
            # released now by one of the three, or still waiting for the sweeper (not due yet)
            assert releases.count("released") <= 1, statuses
            released += releases.count("released")
    state = await world.stock.state(sale.sale_id)
    assert state is not None
    assert state.remaining + state.reserved + state.paid == n
    assert state.paid == paid and state.remaining == released
    for order in orders:
        rec = await world.stock.order(sale.sale_id, order.id)
        assert rec is not None and rec.status in ("paid", "expired", "reserved")
        if rec.status == "paid":
            assert rec.released_at is None
