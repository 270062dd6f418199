"""The commission ledger (over HTTP, against the shared real server) and the persister that moves
orders and ledger lines into SQL (in-process: real Redis, a real SQLite file), including a crash
between its SQL write and its acknowledgement, stale replays, and how its loop stops."""

from __future__ import annotations

import asyncio
import random
import time
from collections import defaultdict
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError
from sqlalchemy import delete, text, update
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import make_transient
from websockets.asyncio.client import connect

from server.auth import Principal
from server.config import Settings
from server.errors import Conflict, NotFound
from server.ids import new_id
from server.inventory import keys
from server.inventory import persister as persister_module
from server.inventory.captures import LateCaptures
from server.inventory.reconcile import reconcile
from server.inventory.records import OrderRecord, Terms
from server.inventory.room_sales import RoomSales
from server.inventory.sales import Sales
from server.inventory.schemas import SaleIn
from server.inventory.stock import Stock
from server.inventory.sweeper import Sweeper
from server.inventory.tables import LedgerEntry, Order, Sale
from tests.inventory.support import (
    World,
    buy,
    end_sale,
    launch,
    new_shop,
    paid,
    pending,
    settle_tracked,
    sql_count,
    sql_ledger,
    sql_orders,
    stream_entries,
    wait_persisted,
)
from tests.support import (
    DB_SPARE,
    Actor,
    ServerProcess,
    api_client,
    backends,
    create_product,
    eventually,
    guest,
    register,
)

PLATFORM_FEE_BP = 500  # the server's defaults (LIVESALE_PLATFORM_FEE_BP, LIVESALE_REFERRAL_SHARE_BP)
REFERRAL_SHARE_BP = 1000


@pytest.fixture(autouse=True)
async def _settle(server: ServerProcess) -> AsyncIterator[None]:
    yield
    await settle_tracked(server.url)


@pytest.fixture
async def world(redis_url: str, sql_url: str) -> AsyncIterator[World]:
    """On SQLite, then on PostgreSQL."""
    async with World.open(redis_url, sql_url) as w:
        yield w


def expected_split(price: int, qty: int, rate_bp: int, referred: bool) -> dict[str, int]:
    """The documented split, computed here on its own (floors everywhere)."""
    gmv = price * qty
    commission = gmv * rate_bp // 10_000
    referral = commission * REFERRAL_SHARE_BP // 10_000 if referred else 0
    out = {"host_commission": commission - referral, "platform_fee": gmv * PLATFORM_FEE_BP // 10_000}
    if referred:
        out["referral_share"] = referral
    return out


async def watch_room(base_url: str, room_id: str, token: str) -> None:
    """Join the room over WebSocket as this user (counted as a unique viewer), then leave."""
    url = "ws://" + base_url.removeprefix("http://") + f"/ws/rooms/{room_id}"
    assert url.startswith("ws://127.0.0.1:"), url
    async with connect(url, additional_headers={"Authorization": f"Bearer {token}"}, proxy=None,
                       open_timeout=10, close_timeout=3) as ws:
        first = await asyncio.wait_for(ws.recv(), 10)
        assert '"welcome"' in str(first), first


# --- the ledger over HTTP ---------------------------------------------------------------------

async def test_ledger_splits_earnings_and_room_stats(server: ServerProcess) -> None:
    async with api_client(server.url) as api:
        host = await register(api, "host")
        shop = await new_shop(api, host=host, price_cents=900, commission_rate_bp=2000)
        cheap_product = (await create_product(api, host, name="Cheap", price_cents=400, commission_rate_bp=1234))["id"]
        a, b, c, d, referrer, viewer = [await guest(api, n) for n in ("a", "b", "c", "d", "ref", "viewer")]
        for who in (a, b, c, d, viewer):
            await watch_room(server.url, shop.room_id, who.token)

        # (buyer, quantity, ref sent, ref that should earn): valid referrers are existing users
        # other than the buyer and the host; a malformed ref is dropped at purchase.
        sale1 = await launch(api, shop, price_cents=799, stock=30, per_user_limit=5)
        plan1: list[tuple[Actor, int, str | None, Actor | None]] = [
            (a, 1, referrer.user_id, referrer),
            (b, 2, a.user_id, a),
            (c, 1, c.user_id, None),            # self-referral
            (d, 3, new_id("usr"), None),        # well-formed, unknown user
            (a, 1, host.user_id, None),         # the host cannot refer to their own sale
            (b, 1, None, None),
        ]
        orders: list[tuple[dict[str, Any], Actor, Actor | None, int]] = []  # order, buyer, referrer, rate
        for buyer, qty, ref, earner in plan1:
            r = await buy(api, buyer, sale1["id"], quantity=qty, ref=ref)
            assert r.status_code == 201, r.text
            orders.append((r.json(), buyer, earner, 2000))
        # Orders that never pay earn nothing: one cancelled, one left reserved.
        r = await buy(api, a, sale1["id"], ref=referrer.user_id)
        cancelled = r.json()
        assert (await api.post(f"/api/orders/{cancelled['order_id']}/cancel", headers=a.auth)).status_code == 200
        unpaid = (await buy(api, b, sale1["id"], ref=referrer.user_id)).json()
        for order, buyer, _, _ in orders:
            await paid(api, buyer, order["order_id"])
        await end_sale(api, shop, sale1["id"])

        shop.product_id = cheap_product
        sale2 = await launch(api, shop, price_cents=333, stock=30, per_user_limit=5)
        for buyer, qty, ref, earner in [(a, 2, referrer.user_id, referrer), (c, 1, "bogus", None),
                                        (d, 1, referrer.user_id, referrer)]:
            r = await buy(api, buyer, sale2["id"], quantity=qty, ref=ref)
            assert r.status_code == 201, r.text
            await paid(api, buyer, r.json()["order_id"])
            orders.append((r.json(), buyer, earner, 1234))

        async with backends(server) as (stock, db):
            for sale in (sale1, sale2):
                report = await wait_persisted(stock, db, sale["id"])
                assert report.ok, report.lines()
            lines = await sql_ledger(db, sale1["id"]) + await sql_ledger(db, sale2["id"])

        by_order: dict[str, dict[str, LedgerEntry]] = defaultdict(dict)
        for line in lines:
            assert line.kind not in by_order[line.order_id], f"two {line.kind} lines for {line.order_id}"
            by_order[line.order_id][line.kind] = line
        assert set(by_order) == {o["order_id"] for o, _, _, _ in orders}  # nothing for unpaid orders
        assert cancelled["order_id"] not in by_order and unpaid["order_id"] not in by_order

        host_total = 0
        referral_totals: dict[str, int] = defaultdict(int)
        gmv_total = 0
        for order, buyer, earner, rate in orders:
            got = by_order[order["order_id"]]
            price, qty = order["price_cents"], order["quantity"]
            gmv = price * qty
            gmv_total += gmv
            want = expected_split(price, qty, rate, earner is not None)
            assert {k: v.amount_cents for k, v in got.items()} == want, (order, buyer.name)
            commission = got["host_commission"].amount_cents + (got["referral_share"].amount_cents
                                                                if "referral_share" in got else 0)
            assert commission == gmv * rate // 10_000
            if earner is not None:
                assert got["referral_share"].amount_cents == commission * 1000 // 10_000
                assert got["referral_share"].account_id == earner.user_id
            assert got["platform_fee"].amount_cents == gmv * 500 // 10_000
            assert got["platform_fee"].account_id == "platform"
            assert got["host_commission"].account_id == host.user_id
            host_total += got["host_commission"].amount_cents
            if earner is not None:
                referral_totals[earner.user_id] += got["referral_share"].amount_cents
        # The rounding cases the prices were picked for.
        assert expected_split(799, 1, 2000, True) == {"host_commission": 144, "referral_share": 15, "platform_fee": 39}
        assert expected_split(333, 2, 1234, True) == {"host_commission": 74, "referral_share": 8, "platform_fee": 33}

        async def earnings(who: Actor) -> dict[str, Any]:
            r = await api.get("/api/me/earnings", headers=who.auth)
            assert r.status_code == 200, r.text
            return dict(r.json())

        mine = await earnings(host)
        assert (mine["host_commission_cents"], mine["referral_share_cents"], mine["total_cents"]) == \
            (host_total, 0, host_total)
        assert sum(e["amount_cents"] for e in mine["entries"]) == host_total
        assert len(mine["entries"]) == len(orders)
        assert {e["kind"] for e in mine["entries"]} == {"host_commission"}
        assert [e["created_at"] for e in mine["entries"]] == sorted((e["created_at"] for e in mine["entries"]),
                                                                    reverse=True)
        for who in (referrer, a):
            theirs = await earnings(who)
            assert theirs["referral_share_cents"] == referral_totals[who.user_id] > 0
            assert theirs["total_cents"] == sum(e["amount_cents"] for e in theirs["entries"])
            assert theirs["total_cents"] == referral_totals[who.user_id]
            assert {e["kind"] for e in theirs["entries"]} == {"referral_share"}
        for who in (c, d, viewer):  # self-referral, unknown or no referrals: nothing
            assert await earnings(who) == {"total_cents": 0, "host_commission_cents": 0,
                                           "referral_share_cents": 0, "entries": []}

        r = await api.get(f"/api/rooms/{shop.room_id}/stats", headers=host.auth)
        assert r.status_code == 200, r.text
        stats = r.json()
        assert stats["orders"] == len(orders) + 2  # the cancelled and the unpaid one count as orders
        assert stats["paid_orders"] == len(orders)
        assert stats["units_sold"] == sum(o["quantity"] for o, _, _, _ in orders)
        assert stats["gmv_cents"] == gmv_total
        assert stats["commission_cents"] == host_total
        assert stats["buyers"] == 4
        assert stats["unique_viewers"] == 5
        assert stats["conversion"] == round(4 / 5, 4)
        other = await api.get(f"/api/rooms/{shop.room_id}/stats", headers=a.auth)
        assert other.status_code == 403


async def test_rates_and_price_are_fixed_at_launch(server: ServerProcess) -> None:
    async with api_client(server.url) as api:
        host = await register(api, "host")
        shop = await new_shop(api, host=host, price_cents=5000, commission_rate_bp=1500)
        sale = await launch(api, shop, price_cents=777, stock=5, per_user_limit=5)
        r = await api.patch(f"/api/products/{shop.product_id}", json={"price_cents": 9999, "commission_rate_bp": 9000},
                            headers=host.auth)
        assert r.status_code == 200, r.text
        buyer = await guest(api, "buyer")
        order = (await buy(api, buyer, sale["id"], quantity=3)).json()
        assert (order["price_cents"], order["total_cents"]) == (777, 2331)
        await paid(api, buyer, order["order_id"])
        async with backends(server) as (stock, db):
            report = await wait_persisted(stock, db, sale["id"])
            assert report.ok, report.lines()
            lines = {line.kind: line.amount_cents for line in await sql_ledger(db, sale["id"])}
        assert lines == expected_split(777, 3, 1500, False) == {"host_commission": 349, "platform_fee": 116}
        earned = (await api.get("/api/me/earnings", headers=host.auth)).json()
        assert earned["host_commission_cents"] == 349


# --- the persister, in-process ----------------------------------------------------------------

async def make_history(world: World) -> tuple[str, dict[str, OrderRecord], str]:
    """A sale with paid (referred, self-referred, plain), cancelled and reserved orders."""
    sale = await world.add_sale(stock=10, limit=3, price_cents=799, commission_rate_bp=1234)
    b1, b2, b3, b4, b5, referrer = await world.add_users(6)
    s = sale.sale_id
    o1 = (await world.reserve(s, b1, quantity=2, ref=referrer)).order
    o2 = (await world.reserve(s, b2)).order
    o3 = (await world.reserve(s, b3, ref=b3)).order
    o4 = (await world.reserve(s, b4)).order
    o5 = (await world.reserve(s, b5, quantity=3)).order
    assert o1 and o2 and o3 and o4 and o5
    for o, buyer in ((o1, b1), (o2, b2), (o3, b3)):
        assert (await world.stock.pay(s, o.id, buyer, "pay-" + o.id[-6:])).status == "paid"
    assert (await world.stock.release(s, o4.id, "cancelled", b4)).status == "released"
    return s, await world.stock.orders(s), referrer


async def test_two_persisters_writing_the_same_orders_at_once_never_deadlock(world: World) -> None:
    """Two jobs processes (several servers on one database) write overlapping orders at once, one
    their reservations in order, the other their payments in the reverse order: both commit (on
    PostgreSQL, row locks taken in opposite orders deadlocked, and a pass was lost to it; three
    rounds, as the two transactions overlap by timing: the old code failed most rounds)."""
    n = 1000
    for _ in range(3):
        sale = await world.add_sale(stock=n, limit=1)
        buyers = await world.add_users(n)
        orders = [(await world.reserve(sale.sale_id, b)).order for b in buyers]
        a, b = world.persister("a"), world.persister("b")
        reserved = await a.read(sale.sale_id, count=n)
        for order, buyer in reversed(list(zip(orders, buyers))):
            assert order is not None
            assert (await world.stock.pay(sale.sale_id, order.id, buyer, "p")).status == "paid"
        payments = await b.read(sale.sale_id, count=n)
        assert len(reserved) == len(payments) == n
        assert await asyncio.gather(a.apply(sale.sale_id, reserved), b.apply(sale.sale_id, payments)) == [True, True]
        rows = await sql_orders(world.db, sale.sale_id)
        assert len(rows) == n and {r.status for r in rows.values()} == {"paid"}
        assert len(await sql_ledger(world.db, sale.sale_id)) == 2 * n  # host commission + platform fee each


async def test_crash_between_sql_write_and_ack_is_rewritten_once(world: World) -> None:
    sale_id, orders, referrer = await make_history(world)
    a = world.persister("a")
    entries = await a.read(sale_id)
    assert len(entries) == 9  # 5 reserved, 3 paid, 1 cancelled
    await a.apply(sale_id, entries)
    # ... and "a" dies here: written to SQL, never acknowledged.
    assert await pending(world.stock, sale_id) == 9
    assert await sql_count(world.db, Order, Order.sale_id == sale_id) == 5

    b = world.persister("b", claim_idle_ms=0)
    assert await b.recover(sale_id) == 9
    assert await pending(world.stock, sale_id) == 0
    assert await b.drain(sale_id) == 0 and await b.recover(sale_id) == 0

    rows = await sql_orders(world.db, sale_id)
    assert set(rows) == set(orders)
    for order_id, rec in orders.items():
        row = rows[order_id]
        assert (row.status, row.version, row.quantity, row.buyer_id) == \
            (rec.status, rec.v, rec.quantity, rec.user_id)
        assert row.payment_ref == rec.payment
        assert (row.paid_at is not None) == (rec.status == "paid")
        assert (row.released_at is not None) == (rec.status == "cancelled")
    lines = await sql_ledger(world.db, sale_id)
    kinds = sorted((line.order_id, line.kind) for line in lines)
    assert len(kinds) == len(set(kinds)), "a ledger line was written twice"
    paid_ids = {i for i, rec in orders.items() if rec.status == "paid"}
    assert {line.order_id for line in lines} == paid_ids
    referred = [line for line in lines if line.kind == "referral_share"]
    assert [(line.account_id, line.amount_cents) for line in referred] == [(referrer, 1598 * 1234 // 10_000 // 10)]
    assert len(lines) == 2 * len(paid_ids) + 1  # the self-referral earns nothing
    report = await reconcile(world.stock, world.db, sale_id)
    assert report.ok and report.unpersisted == 0 and report.sql_orders == 5, report.lines()


async def test_replays_never_move_an_order_back(world: World) -> None:
    sale_id, orders, _ = await make_history(world)
    p = world.persister("only", claim_idle_ms=0)
    assert await p.drain(sale_id) == 9
    before = {i: (r.status, r.version, r.paid_at, r.released_at) for i, r in (await sql_orders(world.db, sale_id)).items()}
    ledger_before = sorted((line.order_id, line.kind, line.amount_cents) for line in await sql_ledger(world.db, sale_id))

    history = await stream_entries(world.redis, sale_id)
    for entry in reversed(history):  # newest first, one by one: every older version comes after a newer
        await p.apply(sale_id, [entry])
    await p.apply(sale_id, list(history))  # and the whole stream again
    rng = random.Random(7)
    shuffled = list(history)
    rng.shuffle(shuffled)
    for i in range(0, len(shuffled), 2):
        await p.apply(sale_id, shuffled[i:i + 2])

    after = {i: (r.status, r.version, r.paid_at, r.released_at) for i, r in (await sql_orders(world.db, sale_id)).items()}
    assert after == before
    assert {i: (v[0], v[1]) for i, v in after.items()} == {i: (r.status, r.v) for i, r in orders.items()}
    ledger_after = sorted((line.order_id, line.kind, line.amount_cents) for line in await sql_ledger(world.db, sale_id))
    assert ledger_after == ledger_before
    assert await pending(world.stock, sale_id) == 0


async def test_an_older_version_first_then_the_newer_one(world: World) -> None:
    """Two persisters (two workers) may commit an order's versions in either order."""
    sale = await world.add_sale(stock=3, limit=3)
    (buyer,) = await world.add_users(1)
    order = (await world.reserve(sale.sale_id, buyer)).order
    assert order is not None
    await world.stock.pay(sale.sale_id, order.id, buyer, "p")
    first, second = world.persister("w1"), world.persister("w2")
    got1 = await first.read(sale.sale_id, count=1)   # v1 (reserved)
    got2 = await second.read(sale.sale_id, count=1)  # v2 (paid)
    await second.apply(sale.sale_id, got2)  # the newer commits first
    await first.apply(sale.sale_id, got1)
    await first.ack(sale.sale_id, got1)
    await second.ack(sale.sale_id, got2)
    row = (await sql_orders(world.db, sale.sale_id))[order.id]
    assert (row.status, row.version) == ("paid", 2)
    assert await sql_count(world.db, LedgerEntry, LedgerEntry.order_id == order.id) == 2
    info = await world.redis.xinfo_groups(keys.log(sale.sale_id))
    group = world.stock.persister_group(info)
    assert group is not None
    assert (group["pending"], group["lag"]) == (0, 0)


async def test_sql_failure_keeps_entries_until_a_retry_writes_them(world: World) -> None:
    """SQL away mid-drain: nothing is acknowledged, and the next pass retries this consumer's own
    unacknowledged entries before new ones; nothing is lost or written twice."""
    sale_id, orders, _ = await make_history(world)
    p = world.persister("flaky")
    async with world.engine.begin() as conn:  # a real failure: the table is gone for a moment
        await conn.execute(text("ALTER TABLE orders RENAME TO orders_away"))
    with pytest.raises(DBAPIError):  # SQLite's OperationalError, PostgreSQL's ProgrammingError
        await p.drain(sale_id)
    assert await pending(world.stock, sale_id) == 9
    (buyer,) = await world.add_users(1)
    late = await world.reserve(sale_id, buyer)  # a change made while SQL is away
    assert late.status == "reserved" and late.order is not None
    with pytest.raises(DBAPIError):
        await p.drain(sale_id)  # still away: the same entries, still pending
    async with world.engine.begin() as conn:
        await conn.execute(text("ALTER TABLE orders_away RENAME TO orders"))
    assert await p.drain(sale_id) == 9  # first its own unacknowledged entries
    assert await p.drain(sale_id) == 1  # then the new one
    assert await p.drain(sale_id) == 0
    assert await pending(world.stock, sale_id) == 0
    rows = await sql_orders(world.db, sale_id)
    assert set(rows) == set(orders) | {late.order.id}
    report = await reconcile(world.stock, world.db, sale_id)
    assert report.ok and report.unpersisted == 0, report.lines()


async def test_entries_of_a_sale_missing_in_sql_stay_pending_until_it_is_back(world: World) -> None:
    """A database that lost a sale (restored from an older backup): its orders are kept in the
    stream, unacknowledged, and written once the sale is restored; never dropped."""
    sale = await world.add_sale(stock=5)
    async with world.db.begin() as session:
        row = await session.get(Sale, sale.sale_id)
        assert row is not None
        session.expunge(row)
        make_transient(row)  # to be inserted again on restore
        await session.execute(delete(Sale).where(Sale.id == sale.sale_id))
    (buyer,) = await world.add_users(1)
    reserved = await world.reserve(sale.sale_id, buyer)
    assert reserved.order is not None
    p = world.persister("restoring")
    for _ in range(3):
        assert await p.drain(sale.sale_id) == 0
        assert await pending(world.stock, sale.sale_id) == 1
    assert await sql_orders(world.db, sale.sale_id) == {}
    assert not await p.settled(sale.sale_id)

    async with world.db.begin() as session:
        session.add(row)
    assert await p.drain(sale.sale_id) == 1
    assert await pending(world.stock, sale.sale_id) == 0
    assert set(await sql_orders(world.db, sale.sale_id)) == {reserved.order.id}


async def test_a_settled_sale_is_archived_and_its_orders_are_answered_from_sql(world: World) -> None:
    """Once settled, a sale keeps only its figures in Redis; its orders are read, paid again and
    cancelled again from SQL, with the same answers as before, and a retried purchase makes nothing."""
    sale = await world.add_sale(stock=5, limit=2)
    payer, canceller = await world.add_users(2)
    paid = await world.reserve(sale.sale_id, payer, key="pay-key", quantity=2)
    kept = await world.reserve(sale.sale_id, canceller)
    assert paid.order is not None and kept.order is not None
    assert (await world.stock.pay(sale.sale_id, paid.order.id, payer, "sim_ref")).status == "paid"
    await world.stock.captured(sale.sale_id, paid.order.id)
    assert (await world.stock.release(sale.sale_id, kept.order.id, "cancelled", canceller)).status == "released"
    assert await world.stock.end(sale.sale_id, "host")
    p = world.persister("archiving")
    for _ in range(3):
        await p.drain(sale.sale_id)
    assert await p.settled(sale.sale_id)

    await world.stock.archive(sale.sale_id)
    assert sale.sale_id not in await world.stock.open_sales()
    assert [k for k in keys.all_keys(sale.sale_id) if await world.redis.exists(k)] == [keys.sale(sale.sale_id)]
    state = await world.stock.state(sale.sale_id)
    assert state is not None and state.archived_at > 0
    assert (state.remaining, state.reserved, state.paid) == (3, 0, 2)
    report = await reconcile(world.stock, world.db, sale.sale_id)
    assert report.ok and report.archived and report.sql_orders == 2, report.lines()

    service = world.orders()
    me, them = (Principal(u, "viewer", u[-6:], "session", time.time() + 3600) for u in (payer, canceller))
    assert (await service.get(me, paid.order.id)).status == "paid"
    assert (await service.pay(me, paid.order.id)).status == "paid"  # paying again: the same answer
    with pytest.raises(Conflict) as refused:
        await service.cancel(me, paid.order.id)
    assert refused.value.code == "paid"
    assert (await service.cancel(them, kept.order.id)).status == "cancelled"  # again: the same answer
    with pytest.raises(Conflict) as refused:
        await service.pay(them, kept.order.id)
    assert refused.value.code == "cancelled"
    with pytest.raises(NotFound):
        await service.get(them, paid.order.id)  # somebody else's
    again = await world.reserve(sale.sale_id, payer, key="pay-key", quantity=2)
    assert again.status == "ended"  # the key is forgotten, and nothing new is sold
    assert (await reconcile(world.stock, world.db, sale.sale_id)).ok
    # Another persister that still listed the sale reads nothing, and makes no stream again.
    assert await world.persister("late").drain(sale.sale_id) == 0
    assert not await world.redis.exists(keys.log(sale.sale_id))


async def test_the_persister_loop_archives_a_sale_once_it_settles(world: World,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(persister_module, "CLAIM_EVERY_S", 0.1)
    sale = await world.add_sale(stock=3)
    (buyer,) = await world.add_users(1)
    reserved = await world.reserve(sale.sale_id, buyer)
    assert reserved.order is not None
    persister = world.persister("looping")
    loop = asyncio.gather(persister.run(), persister.watch.listen())  # the loop and the wakes it visits on
    try:
        async def archived() -> bool:
            state = await world.stock.state(sale.sale_id)
            return state is not None and state.archived_at > 0
        await asyncio.sleep(0.5)
        assert not await archived()  # on sale, then ended with an order reserved: not settled
        assert await world.stock.end(sale.sale_id, "host")
        await asyncio.sleep(0.5)
        assert not await archived()
        await world.stock.release(sale.sale_id, reserved.order.id, "cancelled", buyer)
        await world.stock.wake([sale.sale_id])  # as the cancel's notifier does, on its next tick
        await eventually(archived, timeout=10, what="the sale archived")
    finally:
        loop.cancel()
        await asyncio.gather(loop, return_exceptions=True)
    assert set(await sql_orders(world.db, sale.sale_id)) == {reserved.order.id}
    assert (await sql_orders(world.db, sale.sale_id))[reserved.order.id].status == "cancelled"


class FailingCreate(Stock):
    """Redis fails at the launch's one Redis write: before it, or after it (the answer lost)."""

    written = False

    async def create(self, t: Terms) -> None:
        if self.written:
            await super().create(t)
        raise RedisConnectionError("Redis went away during the launch")


@pytest.mark.parametrize("written", [False, True], ids=["before-the-write", "answer-lost"])
async def test_a_launch_that_fails_at_redis_never_leaves_a_second_sale_running(
        world: World, tmp_path: Path, written: bool) -> None:
    """Whatever fails, a sale in Redis is the room's: the host sees it (and can end it), and no
    second sale runs beside it; a sale that never reached Redis shows nowhere and blocks nothing."""
    rooms = await world.room_service()
    room_sales = RoomSales(world.redis)
    settings = Settings(data_dir=tmp_path, redis_url=None, database_url="", secret_key="")
    earlier = await world.add_sale()  # the room's previous sale, ended
    assert await world.stock.end(earlier.sale_id, "host")
    await room_sales.set_current(earlier.room_id, earlier.sale_id)
    host = Principal(earlier.host_id, "host", "host", "session", time.time() + 3600)
    async with world.db() as session:
        product_id = (await session.get(Sale, earlier.sale_id)).product_id  # type: ignore[union-attr]
    body = SaleIn(product_id=product_id, price_cents=500, stock=3, per_user_limit=1, duration_s=600)
    failing = FailingCreate(world.redis, world.stock.group.removeprefix("persister:"))
    failing.written = written
    try:
        with pytest.raises(RedisConnectionError):
            await Sales(settings, failing, room_sales, world.db, rooms).launch(host, earlier.room_id, body)
    finally:
        failing.disconnect()
    service = Sales(settings, world.stock, room_sales, world.db, rooms)
    failed = await room_sales.current(earlier.room_id)
    assert failed is not None
    assert failed not in (None, earlier.sale_id)
    if written:
        assert (await service.get(failed)).status == "active"
        with pytest.raises(Conflict) as refused:
            await service.launch(host, earlier.room_id, body)
        assert refused.value.code == "sale_running"
        assert (await service.end(host, failed)).status == "ended"
    else:
        assert failed not in await world.stock.open_sales()
        with pytest.raises(NotFound):
            await service.get(failed)  # nothing shows it
    again = await service.launch(host, earlier.room_id, body)
    assert again.status == "active" and await room_sales.current(earlier.room_id) == again.id


async def test_reconcile_reports_differences(world: World) -> None:
    """The oracle the other tests lean on: it does see what it is meant to see."""
    sale_id, orders, _ = await make_history(world)
    report = await reconcile(world.stock, world.db, sale_id)
    assert report.unpersisted == 9 and report.sql_orders == 0 and report.ok, report.lines()  # behind, not wrong
    await world.persister("r").drain(sale_id)
    assert (await reconcile(world.stock, world.db, sale_id)).ok

    some_paid = next(i for i, o in orders.items() if o.status == "paid")
    some_reserved = next(i for i, o in orders.items() if o.status == "reserved")
    async with world.db.begin() as session:
        await session.execute(update(Order).where(Order.id == some_paid).values(status="reserved", version=1))
        await session.execute(delete(Order).where(Order.id == some_reserved))
    report = await reconcile(world.stock, world.db, sale_id)
    assert not report.ok
    assert any(some_paid in p and "Redis paid" in p for p in report.problems), report.lines()
    assert any(p == f"order {some_reserved} missing in SQL" for p in report.problems), report.lines()

    await world.redis.hincrby(keys.sale(sale_id), "remaining", 1)  # a unit out of thin air
    report = await reconcile(world.stock, world.db, sale_id)
    assert "remaining + reserved + paid != stock" in report.problems, report.lines()
    assert not (await reconcile(world.stock, world.db, new_id("sale"))).ok


async def test_reconcile_sees_a_sale_missing_in_sql_and_entries_nobody_persists(world: World) -> None:
    """While the stream holds entries, a sale missing in SQL is still a difference, and so are
    entries older than a persister would leave them: never read, or read and never written (they
    used to read as "behind, not wrong" forever, with `livesale reconcile` saying OK)."""
    sale_id, _, _ = await make_history(world)
    assert (await reconcile(world.stock, world.db, sale_id)).ok  # just now: behind, not wrong
    await asyncio.sleep(0.1)
    stuck = "stream entries waiting"
    report = await reconcile(world.stock, world.db, sale_id, stuck_after_ms=50)  # never read
    assert report.unpersisted == 9 and any(p.startswith(stuck) for p in report.problems), report.lines()

    dead = world.persister("dies")
    assert len(await dead.read(sale_id)) == 9  # read, and its process dies before writing them
    report = await reconcile(world.stock, world.db, sale_id, stuck_after_ms=50)
    assert report.unpersisted == 9 and any(p.startswith(stuck) for p in report.problems), report.lines()
    assert (await reconcile(world.stock, world.db, sale_id)).ok  # under the default bound: in flight

    async with world.db.begin() as session:
        await session.execute(delete(Sale).where(Sale.id == sale_id))
    report = await reconcile(world.stock, world.db, sale_id)
    assert report.unpersisted == 9 and report.problems == ["sale not in SQL"], report.lines()


async def test_background_loops_stop_on_one_cancel(redis_url: str, tmp_path: Path) -> None:
    """One task.cancel() stops the persister's, the sweeper's and the late captures' loops.

    Found by this suite: on Python 3.11 redis-py sends each command through asyncio.wait_for (the
    pool sets a socket timeout), which swallows a cancel that lands as the send completes, so the
    loops went on and the server's shutdown hung until SIGKILL. Fixed in 2dc432b (server/loops.py:
    the loops check Task.cancelling() each pass; the shutdown cancels until they are done)."""
    async with World.open(redis_url, tmp_path / "loops.db", db_index=DB_SPARE) as world:
        for _ in range(20):  # open sales keep the loops issuing Redis commands
            sale = await world.add_sale()
            await world.redis.hset(keys.sale(sale.sale_id), "started_announced", 1)
        sweeper = Sweeper(world.stock, None, None)  # type: ignore[arg-type]  # no start/end/release to announce
        captures = LateCaptures(world.stock, None)  # type: ignore[arg-type]  # no capture is owed
        rng = random.Random(99)
        survived: list[str] = []
        for trial in range(21):
            which = ("persister", "sweeper", "captures")[trial % 3]
            loop = (world.persister(f"c{trial}").run() if which == "persister"
                    else sweeper.run() if which == "sweeper" else captures.run())
            task = asyncio.create_task(loop)
            await asyncio.sleep(rng.uniform(0.005, 0.06))
            task.cancel()
            done, _ = await asyncio.wait({task}, timeout=5.0)  # a bound, not a speed: one pass suffices
            if not done:
                survived.append(f"{which} (trial {trial})")
                for _ in range(100):  # bounded: stop it for good before leaving
                    task.cancel()
                    done, _ = await asyncio.wait({task}, timeout=0.2)
                    if done:
                        break
                assert done, "the loop could not be stopped at all"
                break
        assert not survived, f"still running 5 s after task.cancel(): {survived}"
