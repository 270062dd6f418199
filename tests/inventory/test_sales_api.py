"""Sales over HTTP: who may launch and end them, their time window, the one-sale-per-room rule,
validation, and the order endpoints' refusals. Against the shared real server."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from sqlalchemy import update

from server.clock import from_ms, iso
from server.ids import new_id
from server.inventory import sweeper
from server.inventory.tables import Sale
from server.models import Product, Room
from tests.inventory.support import (
    PERSIST_TIMEOUT_S,
    Shop,
    assert_balanced,
    bought,
    buy,
    end_sale,
    error_of,
    get_order,
    get_sale,
    launch,
    launch_raw,
    new_shop,
    paid,
    pay,
    sale_body,
    settle_tracked,
)
from tests.postgres import on_every_backend
from tests.rooms.support import of_type, open_viewer
from tests.support import (
    Actor,
    ServerProcess,
    api_client,
    assert_error,
    backends,
    bearer,
    create_product,
    eventually,
    guest,
    open_sql,
    register,
    server_db_url,
)

# Every test here that uses a server runs on SQLite, then on PostgreSQL.
server = on_every_backend()


@pytest.fixture
async def api(server: ServerProcess) -> AsyncIterator[httpx.AsyncClient]:
    async with api_client(server.url) as c:
        yield c


@pytest.fixture(autouse=True)
async def _settle(server: ServerProcess) -> AsyncIterator[None]:
    yield
    await settle_tracked(server.url)


@pytest.fixture(scope="module")
async def hosts(server: ServerProcess) -> tuple[Actor, Actor]:
    """Two registered hosts for the whole module (registering hashes a password: slow on purpose)."""
    async with api_client(server.url) as c:
        return await register(c, "host"), await register(c, "host")


@pytest.fixture
async def shop(api: httpx.AsyncClient, hosts: tuple[Actor, Actor]) -> Shop:
    return await new_shop(api, host=hosts[0])


@pytest.fixture
def other(hosts: tuple[Actor, Actor]) -> Actor:
    return hosts[1]


def final_ended_iso(sale: dict[str, Any]) -> str:
    """An end by time is dated at the sale's ends_at."""
    return iso(from_ms(sale["ends_at_ms"])) or ""


# --- the sale's window -------------------------------------------------------------------------

async def test_launch_answers_the_sale(api: httpx.AsyncClient, shop: Shop) -> None:
    sale = await launch(api, shop, stock=7, per_user_limit=3, price_cents=1234, duration_s=600, payment_timeout_s=60)
    assert sale["status"] == "active" and sale["room_id"] == shop.room_id
    assert (sale["stock"], sale["remaining"], sale["reserved"], sale["paid"], sale["sold"]) == (7, 7, 0, 0, 0)
    assert (sale["per_user_limit"], sale["price_cents"], sale["payment_timeout_s"]) == (3, 1234, 60)
    assert sale["product"]["id"] == shop.product_id and sale["product"]["list_price_cents"] == 1999
    assert sale["ends_at_ms"] - sale["starts_at_ms"] == 600_000
    assert sale["ended_at"] is None and sale["end_reason"] is None
    assert await get_sale(api, sale["id"]) == sale
    listed = await api.get(f"/api/rooms/{shop.room_id}/sales")
    assert listed.status_code == 200 and [s["id"] for s in listed.json()] == [sale["id"]]


async def test_the_start_is_announced_as_a_newer_version_of_the_sale(api: httpx.AsyncClient, shop: Shop,
                                                                     server: ServerProcess) -> None:
    """Clients apply a sale event only if its `v` is higher than the last one seen: the start's
    `sale` event had the launch's `v`, so a client written from the protocol kept "scheduled"."""
    async with open_viewer(server.url, shop.room_id) as viewer:
        sale = await launch(api, shop, starts_in_s=1)
        assert sale["status"] == "scheduled"
        launched = await viewer.expect(of_type("sale"))
        started = await viewer.expect(lambda e: e["type"] == "sale" and e["sale"]["status"] == "active",
                                      timeout=10, what="the start")
    assert launched["sale"]["v"] == sale["v"] and started["sale"]["v"] > sale["v"], (launched, started)


async def test_a_sale_open_at_launch_is_announced_once_by_the_launch(api: httpx.AsyncClient, shop: Shop,
                                                                      server: ServerProcess) -> None:
    """The launch's `sale` event already says "active": the sweeper announces no start (which
    would repeat the event as a new version, and race the launch's answer)."""
    async with open_viewer(server.url, shop.room_id) as viewer:
        sale = await launch(api, shop)
        launched = await viewer.expect(of_type("sale"))
        assert launched["sale"]["status"] == "active" and launched["sale"]["v"] == sale["v"]
        await asyncio.sleep(4 * sweeper.EVERY_S)  # four passes of the sweeper
        events = await viewer.ping()  # what reached the viewer before its pong
    assert not [e for e in events if e.get("type") == "sale"], events
    assert (await get_sale(api, sale["id"]))["v"] == sale["v"]


async def test_an_order_answer_has_every_field_with_nulls_and_remaining_on_purchases(api: httpx.AsyncClient,
                                                                                     shop: Shop) -> None:
    """Like every other shape, an order says null for what has not happened (it left `paid_at`
    and `released_at` out); `remaining` comes with purchase answers only."""
    sale = await launch(api, shop, stock=5)
    buyer = await guest(api, "buyer")
    fields = {"order_id", "sale_id", "status", "quantity", "price_cents", "total_cents", "pay_by", "created_at",
              "paid_at", "released_at"}
    r = await buy(api, buyer, sale["id"])
    assert r.status_code == 201 and set(r.json()) == fields | {"remaining"}, r.text
    order = r.json()
    assert (order["paid_at"], order["released_at"]) == (None, None)
    got = await get_order(api, buyer, order["order_id"])
    assert set(got) == fields and got["paid_at"] is None
    done = await paid(api, buyer, order["order_id"])
    assert set(done) == fields and done["paid_at"] is not None and done["released_at"] is None


async def test_buying_before_the_start_is_not_started(api: httpx.AsyncClient, shop: Shop) -> None:
    sale = await launch(api, shop, starts_in_s=30)
    assert sale["status"] == "scheduled"
    buyer = await guest(api, "buyer")
    r = await buy(api, buyer, sale["id"])
    assert_error(r, 409, "not_started")
    after = await get_sale(api, sale["id"])
    assert (after["remaining"], after["sold"]) == (sale["stock"], 0)
    # A scheduled sale holds the room as much as an active one.
    assert_error(await launch_raw(api, shop), 409, "sale_running")


async def test_buying_after_the_end_by_time_is_ended(api: httpx.AsyncClient, server: ServerProcess,
                                                     shop: Shop) -> None:
    sale = await launch(api, shop, duration_s=1)
    buyer = await guest(api, "buyer")

    async def ended_by_the_sweeper() -> dict[str, Any] | None:
        s = await get_sale(api, sale["id"])
        return s if s["end_reason"] == "time" else None

    final = await eventually(ended_by_the_sweeper, timeout=PERSIST_TIMEOUT_S, what="the sweeper ending the sale")
    assert final["status"] == "ended" and final["ended_at"] == final_ended_iso(final)
    assert_error(await buy(api, buyer, sale["id"]), 409, "ended")
    assert (await get_sale(api, sale["id"]))["remaining"] == sale["stock"]
    # The end reaches SQL through the persister.
    async with open_sql(server_db_url(server)) as db:
        async def persisted() -> Sale | None:
            async with db() as session:
                row = await session.get(Sale, sale["id"])
            return row if row is not None and row.ended_at is not None else None

        row = await eventually(persisted, timeout=PERSIST_TIMEOUT_S, what="sales.ended_at in SQL")
        assert row.end_reason == "time"
    # The room is free again.
    await launch(api, shop)


async def test_host_ends_the_sale_and_reserved_orders_stay_payable(api: httpx.AsyncClient, shop: Shop) -> None:
    sale = await launch(api, shop, stock=5, per_user_limit=2)
    buyer, late = await guest(api, "buyer"), await guest(api, "buyer")
    order = await bought(api, buyer, sale["id"], quantity=2)

    ended = await end_sale(api, shop, sale["id"])
    assert ended["status"] == "ended" and ended["end_reason"] == "host" and ended["ended_at"] is not None
    assert ended["v"] > sale["v"]
    again = await end_sale(api, shop, sale["id"])  # ending twice changes nothing
    assert (again["ended_at"], again["end_reason"], again["v"]) == (ended["ended_at"], "host", ended["v"])

    assert_error(await buy(api, late, sale["id"]), 409, "ended")
    assert_error(await buy(api, buyer, sale["id"]), 409, "ended")
    done = await paid(api, buyer, order["order_id"])
    assert done["quantity"] == 2 and done["paid_at"] is not None
    final = await get_sale(api, sale["id"])
    assert_balanced(final)
    assert (final["remaining"], final["reserved"], final["paid"], final["status"]) == (3, 0, 2, "ended")
    # Ended, the room takes a new sale.
    await launch(api, shop)


async def test_ending_the_room_ends_its_sale(api: httpx.AsyncClient, shop: Shop) -> None:
    sale = await launch(api, shop, stock=3, per_user_limit=3)
    buyer = await guest(api, "buyer")
    order = await bought(api, buyer, sale["id"])
    r = await api.post(f"/api/rooms/{shop.room_id}/end", headers=shop.host.auth)
    assert r.status_code == 200, r.text
    s = await get_sale(api, sale["id"])
    assert (s["status"], s["end_reason"]) == ("ended", "host") and s["ended_at"] is not None
    assert_error(await buy(api, buyer, sale["id"]), 409, "ended")
    await paid(api, buyer, order["order_id"])  # a reservation stays payable until its pay-by
    assert_error(await launch_raw(api, shop), 409, "room_ended")


async def test_ending_the_room_again_completes_an_end_that_failed_after_its_commit(
        api: httpx.AsyncClient, shop: Shop, server: ServerProcess) -> None:
    """The first call committed `ended` and then failed (Redis away) before it ended the sale: the
    host's retry still ends it."""
    sale = await launch(api, shop, stock=3)
    async with open_sql(server_db_url(server)) as db:
        async with db.begin() as session:
            await session.execute(update(Room).where(Room.id == shop.room_id).values(status="ended"))
    assert (await get_sale(api, sale["id"]))["status"] == "active"
    r = await api.post(f"/api/rooms/{shop.room_id}/end", headers=shop.host.auth)
    assert r.status_code == 200 and r.json()["status"] == "ended", r.text
    s = await get_sale(api, sale["id"])
    assert (s["status"], s["end_reason"]) == ("ended", "host")
    assert_error(await buy(api, await guest(api, "buyer"), sale["id"]), 409, "ended")


async def test_ending_a_sale_again_tells_the_room_an_end_whose_answer_was_lost(
        api: httpx.AsyncClient, shop: Shop, server: ServerProcess) -> None:
    """The end script ran but its answer was lost (here: the sale is ended in Redis directly), so
    nobody told the room: the host's retry does, and answers the sale as ended."""
    sale = await launch(api, shop, stock=3)
    async with open_viewer(server.url, shop.room_id, label="watching") as viewer:
        async with backends(server) as (stock, _):
            assert await stock.end(sale["id"], "host")
        ended = await end_sale(api, shop, sale["id"])
        assert (ended["status"], ended["end_reason"]) == ("ended", "host")
        event = await viewer.expect(of_type("sale_ended", id=sale["id"]), what="sale_ended")
        assert event["reason"] == "host"


async def test_a_scheduled_sale_ended_early_refuses_with_ended(api: httpx.AsyncClient, shop: Shop) -> None:
    sale = await launch(api, shop, starts_in_s=30)
    ended = await end_sale(api, shop, sale["id"])
    assert ended["status"] == "ended" and ended["end_reason"] == "host"
    buyer = await guest(api, "buyer")
    assert_error(await buy(api, buyer, sale["id"]), 409, "ended")


async def test_end_is_for_the_owner_only(api: httpx.AsyncClient, shop: Shop, other: Actor) -> None:
    sale = await launch(api, shop)
    viewer = await guest(api, "buyer")
    assert_error(await api.post(f"/api/sales/{sale['id']}/end", headers=other.auth), 403, "not_owner")
    assert_error(await api.post(f"/api/sales/{sale['id']}/end", headers=viewer.auth), 403, "host_only")
    assert_error(await api.post(f"/api/sales/{sale['id']}/end"), 401, "unauthorized")
    assert_error(await api.post(f"/api/sales/{new_id('sale')}/end", headers=shop.host.auth), 404, "sale_not_found")
    assert (await get_sale(api, sale["id"]))["status"] == "active"


async def test_a_commission_that_no_longer_fits_beside_the_platform_fee_is_not_launched(
        api: httpx.AsyncClient, shop: Shop, server: ServerProcess) -> None:
    """A product priced at 96% commission before the platform's fee (5%) was raised to it: commission
    and fee would pay out more than the sale takes in, so the launch is refused until it is lowered."""
    async with open_sql(server_db_url(server)) as db:
        async with db.begin() as session:
            await session.execute(update(Product).where(Product.id == shop.product_id).values(commission_rate_bp=9600))
    r = await launch_raw(api, shop)
    assert_error(r, 409, "commission_too_high")
    assert (await api.get(f"/api/rooms/{shop.room_id}/sales")).json() == []
    r = await api.patch(f"/api/products/{shop.product_id}", json={"commission_rate_bp": 9500}, headers=shop.host.auth)
    assert r.status_code == 200, r.text
    await end_sale(api, shop, (await launch(api, shop))["id"])


# --- one sale per room ------------------------------------------------------------------------

async def test_second_sale_while_one_runs_is_sale_running(api: httpx.AsyncClient, shop: Shop) -> None:
    first = await launch(api, shop)
    assert_error(await launch_raw(api, shop, stock=3), 409, "sale_running")
    listed = (await api.get(f"/api/rooms/{shop.room_id}/sales")).json()
    assert [s["id"] for s in listed] == [first["id"]]
    await end_sale(api, shop, first["id"])
    second = await launch(api, shop, stock=3)
    listed = (await api.get(f"/api/rooms/{shop.room_id}/sales")).json()
    assert [s["id"] for s in listed] == [second["id"], first["id"]]  # newest first


async def test_another_hosts_launch_attempts_never_hold_up_the_owners(api: httpx.AsyncClient, shop: Shop,
                                                                     other: Actor) -> None:
    """A launch takes the room's lock only once its caller is known to own the room: a stranger
    spamming launches at it gets 403s and never makes the owner's launch answer `sale_running`."""
    stop = asyncio.Event()

    async def spam() -> int:
        n = 0
        while not stop.is_set() and n < 2000:
            assert_error(await launch_raw(api, shop, other.token), 403, "not_owner")
            n += 1
        return n
    spammers = [asyncio.create_task(spam()) for _ in range(4)]
    try:
        for _ in range(5):
            sale = await launch(api, shop)  # 201 every time
            await end_sale(api, shop, sale["id"])
    finally:
        stop.set()
        assert all(n > 0 for n in await asyncio.gather(*spammers))


async def test_concurrent_launches_in_one_room_start_one_sale(api: httpx.AsyncClient, shop: Shop) -> None:
    # Several rooms, ten launches at once in each: every room must end up with one running sale.
    # Found by this suite (the check for a running sale and the launch interleaved, so 2-5 sales
    # ran at once in one room); fixed in 2dc432b with a per-room launch lock.
    rooms = [shop] + [await new_shop(api, host=shop.host) for _ in range(5)]
    running: dict[str, int] = {}
    for room in rooms:
        await asyncio.gather(*(api.get("/healthz") for _ in range(10)))  # open the connections first
        answers = await asyncio.gather(*(launch_raw(api, room, stock=5) for _ in range(10)))
        for r in answers:
            assert r.status_code == 201 or error_of(r) == "sale_running", r.text
        sales = (await api.get(f"/api/rooms/{room.room_id}/sales")).json()
        running[room.room_id] = sum(s["status"] != "ended" for s in sales)
        assert running[room.room_id] == sum(r.status_code == 201 for r in answers)
    assert set(running.values()) == {1}, f"running sales per room: {sorted(running.values())}"


async def test_sale_window_starts_at_launch_and_lasts_duration(api: httpx.AsyncClient, shop: Shop) -> None:
    # Found by this suite: launches were truncated to the second (a sale started up to 1 s before
    # it was launched, and a 1 s sale could be over at once); fixed in 2dc432b.
    for duration in (1, 60):
        sent_ms = int(time.time() * 1000)
        sale = await launch(api, shop, duration_s=duration)
        done_ms = int(time.time() * 1000)
        assert sent_ms <= sale["starts_at_ms"] <= done_ms, (sent_ms, sale["starts_at_ms"], done_ms)
        assert sale["ends_at_ms"] - sale["starts_at_ms"] == duration * 1000
        assert sale["starts_at"] == iso(from_ms(sale["starts_at_ms"]))
        await end_sale(api, shop, sale["id"])


# --- who may launch ---------------------------------------------------------------------------

async def test_launch_permissions_and_lookups(api: httpx.AsyncClient, shop: Shop, other: Actor) -> None:
    viewer = await guest(api, "buyer")
    foreign_product = (await create_product(api, other, name="Flash tea"))["id"]

    assert_error(await launch_raw(api, shop, token=viewer.token), 403, "host_only")
    assert_error(await launch_raw(api, shop, token=other.token), 403, "not_owner")
    assert_error(await api.post(f"/api/rooms/{shop.room_id}/sales", json=sale_body(shop)), 401, "unauthorized")
    assert_error(await launch_raw(api, shop, product_id=foreign_product), 403, "not_owner")
    assert_error(await launch_raw(api, shop, product_id=new_id("prd")), 404, "product_not_found")
    assert_error(await launch_raw(api, shop, product_id="nonsense"), 404, "product_not_found")
    r = await api.post(f"/api/rooms/{new_id('room')}/sales", json=sale_body(shop), headers=shop.host.auth)
    assert_error(r, 404, "room_not_found")
    assert (await api.get(f"/api/rooms/{shop.room_id}/sales")).json() == []

    ended_room = await new_shop(api, host=shop.host)
    r = await api.post(f"/api/rooms/{ended_room.room_id}/end", headers=shop.host.auth)
    assert r.status_code == 200, r.text
    assert_error(await launch_raw(api, ended_room), 409, "room_ended")


@pytest.mark.parametrize(("fields", "field"), [
    ({"stock": 0}, "stock"),
    ({"stock": 1_000_001}, "stock"),
    ({"per_user_limit": 0}, "per_user_limit"),
    ({"per_user_limit": 101}, "per_user_limit"),
    ({"price_cents": 0}, "price_cents"),
    ({"price_cents": "10"}, "price_cents"),
    ({"duration_s": 0}, "duration_s"),
    ({"starts_in_s": -1}, "starts_in_s"),
    ({"payment_timeout_s": 0}, "payment_timeout_s"),
    ({"payment_timeout_s": 86_401}, "payment_timeout_s"),
    ({"stock": 1.5}, "stock"),
    ({"product_id": None}, "product_id"),
    ({"surprise": 1}, "surprise"),
])
async def test_invalid_sale_bodies_are_422_naming_the_field(api: httpx.AsyncClient, shop: Shop,
                                                            fields: dict[str, Any], field: str) -> None:
    assert_error(await launch_raw(api, shop, **fields), 422, "invalid", field)
    assert (await api.get(f"/api/rooms/{shop.room_id}/sales")).json() == []


async def test_missing_required_sale_field_is_422(api: httpx.AsyncClient, shop: Shop) -> None:
    for name in ("product_id", "price_cents", "stock", "per_user_limit", "duration_s"):
        body = sale_body(shop)
        del body[name]
        r = await api.post(f"/api/rooms/{shop.room_id}/sales", json=body, headers=shop.host.auth)
        assert_error(r, 422, "invalid", name)


async def test_sales_of_an_unknown_room_are_404(api: httpx.AsyncClient) -> None:
    # Found by this suite (it answered 200 []); fixed in 2dc432b.
    assert_error(await api.get(f"/api/rooms/{new_id('room')}/sales"), 404, "room_not_found")


# --- purchase and order refusals --------------------------------------------------------------

async def test_purchase_refusals(api: httpx.AsyncClient, shop: Shop) -> None:
    sale = await launch(api, shop, stock=3, per_user_limit=2)
    a, b = await guest(api, "buyer"), await guest(api, "buyer")
    url = f"/api/sales/{sale['id']}/purchase"

    assert_error(await api.post(url, json={}, headers=a.auth), 400, "idempotency_key_required", "Idempotency-Key")
    for bad in ("", "x" * 129, "tab\there"):
        r = await api.post(url, json={}, headers={**a.auth, "Idempotency-Key": bad})
        assert_error(r, 400, "idempotency_key_required", "Idempotency-Key")
    assert_error(await api.post(url, json={}, headers={"Idempotency-Key": "k1"}), 401, "unauthorized")
    for body, field in (({"quantity": 0}, "quantity"), ({"quantity": 101}, "quantity"),
                        ({"quantity": "1"}, "quantity"), ({"ref": "r" * 65}, "ref"), ({"qty": 1}, "qty")):
        r = await api.post(url, json=body, headers={**a.auth, "Idempotency-Key": secrets.token_hex(4)})
        assert_error(r, 422, "invalid", field)
    r = await api.post(url, content=b"{", headers={**a.auth, "Idempotency-Key": "k2",
                                                    "Content-Type": "application/json"})
    assert_error(r, 400, "malformed_json")
    for sale_id in (new_id("sale"), "sale_nope", "nonsense"):
        assert_error(await buy(api, a, sale_id), 404, "sale_not_found")
        assert_error(await api.get(f"/api/sales/{sale_id}"), 404, "sale_not_found")

    assert_error(await buy(api, a, sale["id"], quantity=3), 409, "limit_exceeded")
    first = await bought(api, a, sale["id"], quantity=2)
    assert first["remaining"] == 1 and first["total_cents"] == 2 * sale["price_cents"]
    assert_error(await buy(api, a, sale["id"]), 409, "limit_exceeded")
    assert_error(await buy(api, b, sale["id"], quantity=2), 409, "not_enough")
    last = await bought(api, b, sale["id"])
    assert last["remaining"] == 0
    assert_error(await buy(api, b, sale["id"]), 409, "sold_out")
    final = await get_sale(api, sale["id"])
    assert_balanced(final)
    assert (final["remaining"], final["reserved"]) == (0, 3)


async def test_order_endpoints_belong_to_the_buyer(api: httpx.AsyncClient, shop: Shop) -> None:
    sale = await launch(api, shop, stock=4, per_user_limit=4)
    buyer, stranger = await guest(api, "buyer"), await guest(api, "buyer")
    order = await bought(api, buyer, sale["id"], quantity=2)
    oid = order["order_id"]
    assert (await get_order(api, buyer, oid))["status"] == "reserved"
    assert_error(await api.get(f"/api/orders/{oid}", headers=stranger.auth), 404, "order_not_found")
    assert_error(await api.post(f"/api/orders/{oid}/pay", headers=stranger.auth), 404, "order_not_found")
    assert_error(await api.post(f"/api/orders/{oid}/cancel", headers=stranger.auth), 404, "order_not_found")
    assert_error(await api.post(f"/api/orders/{oid}/pay"), 401, "unauthorized")
    for bad in ("ord_nope", new_id("ord"), oid[:-1] + ("a" if oid[-1] != "a" else "b")):
        assert_error(await api.get(f"/api/orders/{bad}", headers=buyer.auth), 404, "order_not_found")
        assert_error(await api.post(f"/api/orders/{bad}/pay", headers=buyer.auth), 404, "order_not_found")
    assert (await get_order(api, buyer, oid))["status"] == "reserved"
    assert (await get_sale(api, sale["id"]))["reserved"] == 2


async def test_cancel_and_pay_transitions(api: httpx.AsyncClient, shop: Shop) -> None:
    sale = await launch(api, shop, stock=4, per_user_limit=4)
    buyer = await guest(api, "buyer")
    kept = await bought(api, buyer, sale["id"], quantity=1)
    dropped = await bought(api, buyer, sale["id"], quantity=2)

    r = await api.post(f"/api/orders/{dropped['order_id']}/cancel", headers=buyer.auth)
    assert r.status_code == 200 and r.json()["status"] == "cancelled" and r.json()["released_at"], r.text
    again = await api.post(f"/api/orders/{dropped['order_id']}/cancel", headers=buyer.auth)
    assert again.status_code == 200 and again.json() == r.json(), again.text
    assert_error(await pay(api, buyer, dropped["order_id"]), 409, "cancelled")
    s = await get_sale(api, sale["id"])
    assert (s["remaining"], s["reserved"], s["paid"]) == (3, 1, 0)

    first = await paid(api, buyer, kept["order_id"])
    second = await pay(api, buyer, kept["order_id"])  # paying twice: the same paid order
    assert second.status_code == 200 and second.json() == first, second.text
    assert_error(await api.post(f"/api/orders/{kept['order_id']}/cancel", headers=buyer.auth), 409, "paid")
    s = await get_sale(api, sale["id"])
    assert_balanced(s)
    assert (s["remaining"], s["reserved"], s["paid"]) == (3, 0, 1)
    # The limit counts what the buyer holds: 1 paid, so 3 more fit and 4 do not.
    assert_error(await buy(api, buyer, sale["id"], quantity=4), 409, "limit_exceeded")
    await bought(api, buyer, sale["id"], quantity=3)

    async def listed() -> list[dict[str, Any]] | None:
        r = await api.get("/api/orders", headers=buyer.auth)
        assert r.status_code == 200, r.text
        orders = r.json()
        return orders if len(orders) == 3 and {o["status"] for o in orders} == {"paid", "cancelled", "reserved"} \
            else None

    orders = await eventually(listed, timeout=PERSIST_TIMEOUT_S, what="GET /api/orders showing the persisted orders")
    by_id = {o["order_id"]: o for o in orders}
    assert by_id[kept["order_id"]]["status"] == "paid" and by_id[dropped["order_id"]]["status"] == "cancelled"
    assert [o["created_at"] for o in orders] == sorted((o["created_at"] for o in orders), reverse=True)


async def test_concurrent_pays_of_one_order_pay_once(api: httpx.AsyncClient, shop: Shop) -> None:
    sale = await launch(api, shop, stock=2, per_user_limit=2)
    buyer = await guest(api, "buyer")
    order = await bought(api, buyer, sale["id"], quantity=2)
    answers = await asyncio.gather(*(pay(api, buyer, order["order_id"]) for _ in range(10)))
    assert [r.status_code for r in answers] == [200] * 10, [r.text for r in answers]
    assert len({r.json()["paid_at"] for r in answers}) == 1
    s = await get_sale(api, sale["id"])
    assert (s["remaining"], s["reserved"], s["paid"]) == (0, 0, 2)


async def test_orders_need_a_login(api: httpx.AsyncClient) -> None:
    assert_error(await api.get("/api/orders"), 401, "unauthorized")
    assert_error(await api.get("/api/me/earnings"), 401, "unauthorized")
    r = await api.get("/api/orders", headers=bearer("not-a-token"))
    assert_error(r, 401, "invalid_token")


async def test_room_figures_stay_exact_past_32_bits(api: httpx.AsyncClient, hosts: tuple[Actor, Actor]) -> None:
    """One paid order worth more than 2**31 cents (22 units at $1M): the room's figures are exact
    (PostgreSQL multiplied the two 32-bit columns in 32 bits and answered 500)."""
    shop = await new_shop(api, host=hosts[0], price_cents=100_000_000, commission_rate_bp=1000)
    sale = await launch(api, shop, price_cents=100_000_000, stock=22, per_user_limit=100)
    buyer = await guest(api, "whale")
    order = await bought(api, buyer, sale["id"], quantity=22)
    await paid(api, buyer, order["order_id"])

    async def persisted() -> dict[str, Any] | None:
        r = await api.get(f"/api/rooms/{shop.room_id}/stats", headers=hosts[0].auth)
        assert r.status_code == 200, r.text
        return r.json() if r.json()["paid_orders"] == 1 and r.json()["commission_cents"] else None
    stats = await eventually(persisted, timeout=PERSIST_TIMEOUT_S, what="the paid order in the room's figures")
    assert (stats["units_sold"], stats["gmv_cents"]) == (22, 2_200_000_000)
    assert stats["commission_cents"] == 2_200_000_000 * 1000 // 10_000
