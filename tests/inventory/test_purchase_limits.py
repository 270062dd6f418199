"""Purchase rate limits, checked inside reserve.lua (Stock.reserve's `limits`): a refusal changes
nothing, retries never spend, one bucket's refusal spends nothing from another, and under real
concurrency exactly a bucket's burst gets through. In-process against the session Valkey
(`World`), and once over HTTP against the shared server for the 429 the API answers."""

from __future__ import annotations

import asyncio
import secrets
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import httpx
import pytest

from server.inventory import keys
from server.inventory.keys import limit as limit_key
from server.inventory.records import Reservation
from server.inventory.stock import Stock, new_order_id
from server.ratelimit import PURCHASE_PER_USER, Limit
from tests.inventory.support import (
    World,
    buy,
    get_sale,
    hash_ints,
    idem_key,
    launch,
    new_shop,
    redis_now_ms,
    sale_state,
    settle_tracked,
)
from tests.support import (
    DB_IN_PROCESS,
    Actor,
    ServerProcess,
    api_client,
    assert_error,
    guest,
    open_redis,
    redis_db_url,
    register,
)

# Rates so slow that no unit comes back while a test runs: only the burst can be spent.
FROZEN = 0.001  # per second: one unit per 1000 s


@pytest.fixture
async def world(redis_url: str, tmp_path: Path) -> AsyncIterator[World]:
    async with World.open(redis_url, tmp_path / "limits.db") as w:
        yield w


def user_limit(per_second: float = FROZEN, burst: int = 3) -> Limit:
    return Limit(f"t-user-{secrets.token_hex(3)}", per_second=per_second, burst=burst)


def ip_limit(per_second: float = FROZEN, burst: int = 5) -> Limit:
    return Limit(f"t-ip-{secrets.token_hex(3)}", per_second=per_second, burst=burst)


async def attempt(stock: Stock, sale_id: str, user_id: str, limits: list[tuple[Limit, str]], key: str | None = None,
                  quantity: int = 1) -> Reservation:
    return await stock.reserve(sale_id, user_id, key or idem_key(), new_order_id(sale_id), quantity, None, limits)


async def snapshot(world: World, sale_id: str) -> dict[str, Any]:
    """Everything a reservation would change in Redis."""
    redis = world.redis
    raw = await redis.hmget(keys.sale(sale_id), "remaining", "reserved", "paid", "stock", "v")
    return {
        "sale": dict(zip(("remaining", "reserved", "paid", "stock", "v"), (int(cast(bytes, x)) for x in raw))),
        "buyers": await hash_ints(redis, keys.buyers(sale_id)),
        "idem": await redis.hgetall(keys.idempotency(sale_id)),
        "orders": await redis.hgetall(keys.orders(sale_id)),
        "expiry": await redis.zrange(keys.expiry(sale_id), 0, -1, withscores=True),
        "log": await redis.xlen(keys.log(sale_id)),
    }


async def bucket(world: World, sale_id: str, limit: Limit, subject: str) -> bytes | None:
    return cast(bytes | None, await world.redis.get(keys.limit(sale_id, limit.name, subject)))


def balanced(state: dict[str, Any]) -> None:
    s = state["sale"]
    assert s["remaining"] >= 0, s
    assert s["remaining"] + s["reserved"] + s["paid"] == s["stock"], s


# --- in-process, through Stock ------------------------------------------------------------------

async def test_past_the_burst_an_attempt_is_refused_and_changes_nothing(world: World) -> None:
    sale = await world.add_sale(stock=10, limit=10)
    (buyer,) = await world.add_users(1)
    limit = Limit(f"t-user-{secrets.token_hex(3)}", per_second=1, burst=3)
    limits = [(limit, buyer)]
    for _ in range(3):
        assert (await attempt(world.stock, sale.sale_id, buyer, limits)).status == "reserved"
    before = await snapshot(world, sale.sale_id)
    tat_before = await bucket(world, sale.sale_id, limit, buyer)

    outcome = await attempt(world.stock, sale.sale_id, buyer, limits)

    assert outcome.status == "rate_limited", outcome
    assert 0 < outcome.retry_after_ms <= 1000, outcome  # one unit back per second
    assert outcome.order is None
    assert outcome.remaining == 7
    assert await snapshot(world, sale.sale_id) == before  # no order, no stream entry, same v
    assert before["sale"] == {"remaining": 7, "reserved": 3, "paid": 0, "stock": 10, "v": 4}
    assert len(before["orders"]) == 3 and before["log"] == 3
    assert await bucket(world, sale.sale_id, limit, buyer) == tat_before  # a refusal spends nothing


async def test_a_retried_key_is_answered_even_with_an_empty_bucket_and_spends_nothing(world: World) -> None:
    sale = await world.add_sale(stock=10, limit=10)
    (buyer,) = await world.add_users(1)
    limit = user_limit(burst=1)
    limits = [(limit, buyer)]
    key = idem_key()
    first = await attempt(world.stock, sale.sale_id, buyer, limits, key)
    assert first.status == "reserved" and first.order is not None
    assert (await attempt(world.stock, sale.sale_id, buyer, limits)).status == "rate_limited"  # bucket empty
    before = await snapshot(world, sale.sale_id)
    tat_before = await bucket(world, sale.sale_id, limit, buyer)

    for _ in range(5):
        again = await attempt(world.stock, sale.sale_id, buyer, limits, key)
        assert again.status == "duplicate", again
        assert again.order == first.order
    reused = await attempt(world.stock, sale.sale_id, buyer, limits, key, quantity=2)
    assert reused.status == "key_reused", reused  # answered too, rather than rate_limited

    assert await bucket(world, sale.sale_id, limit, buyer) == tat_before
    assert await snapshot(world, sale.sale_id) == before
    assert (await attempt(world.stock, sale.sale_id, buyer, limits)).status == "rate_limited"  # still empty


async def test_a_refusal_by_one_bucket_spends_nothing_from_the_other(world: World) -> None:
    sale = await world.add_sale(stock=20, limit=20)
    alice, bob, carol = await world.add_users(3)
    per_user, per_ip = user_limit(burst=2), ip_limit(burst=5)
    ip = "203.0.113.7"

    def limits(user: str) -> list[tuple[Limit, str]]:
        return [(per_user, user), (per_ip, ip)]  # the order the API sends them in

    for _ in range(2):
        assert (await attempt(world.stock, sale.sale_id, alice, limits(alice))).status == "reserved"
    # Refused by the first bucket (alice's): the address's bucket is not spent.
    ip_before = await bucket(world, sale.sale_id, per_ip, ip)
    assert (await attempt(world.stock, sale.sale_id, alice, limits(alice))).status == "rate_limited"
    assert await bucket(world, sale.sale_id, per_ip, ip) == ip_before

    for _ in range(2):
        assert (await attempt(world.stock, sale.sale_id, bob, limits(bob))).status == "reserved"
    bob_before = await bucket(world, sale.sale_id, per_user, bob)
    assert (await attempt(world.stock, sale.sale_id, bob, limits(bob))).status == "rate_limited"
    assert await bucket(world, sale.sale_id, per_user, bob) == bob_before

    # One unit left at the address: carol takes it, then the address refuses her.
    assert (await attempt(world.stock, sale.sale_id, carol, limits(carol))).status == "reserved"
    carol_before = await bucket(world, sale.sale_id, per_user, carol)
    ip_full = await bucket(world, sale.sale_id, per_ip, ip)
    refused = await attempt(world.stock, sale.sale_id, carol, limits(carol))
    assert refused.status == "rate_limited" and refused.retry_after_ms > 0, refused
    # Refused by the second bucket (the address's): carol's own bucket, which allowed it, is not spent.
    assert await bucket(world, sale.sale_id, per_user, carol) == carol_before
    assert await bucket(world, sale.sale_id, per_ip, ip) == ip_full

    # A fresh buyer at the full address leaves no bucket of their own behind.
    (dave,) = await world.add_users(1)
    assert (await attempt(world.stock, sale.sale_id, dave, limits(dave))).status == "rate_limited"
    assert await bucket(world, sale.sale_id, per_user, dave) is None
    # Elsewhere, dave buys: his bucket was untouched, and the address's counts only for it.
    assert (await attempt(world.stock, sale.sale_id, dave, [(per_user, dave), (per_ip, "198.51.100.1")])).status \
        == "reserved"
    state = await snapshot(world, sale.sale_id)
    assert state["sale"]["reserved"] == 6 and state["log"] == 6
    balanced(state)


async def test_under_concurrency_exactly_the_burst_gets_through(world: World, redis_url: str) -> None:
    burst, n = 10, 200
    sale = await world.add_sale(stock=100, limit=100)
    (buyer,) = await world.add_users(1)
    limit = user_limit(burst=burst)
    # Several clients (connections, each with its own automatic pipeline), so batches of the
    # same buyer's attempts really run side by side.
    async with open_redis(redis_db_url(redis_url, DB_IN_PROCESS), 16) as r1, \
            open_redis(redis_db_url(redis_url, DB_IN_PROCESS), 16) as r2:
        stocks = [world.stock, Stock(r1, "limits-a"), Stock(r2, "limits-b")]
        try:
            gate = asyncio.Event()

            async def one(i: int) -> Reservation:
                await gate.wait()
                if i % 7 == 0:
                    await asyncio.sleep(0.001 * (i % 5))  # some in later turns, in batches of their own
                return await attempt(stocks[i % len(stocks)], sale.sale_id, buyer, [(limit, buyer)])

            tasks = [asyncio.create_task(one(i)) for i in range(n)]
            await asyncio.sleep(0)
            gate.set()
            outcomes = await asyncio.wait_for(asyncio.gather(*tasks), 30)
        finally:
            for stock in stocks[1:]:
                stock.disconnect()

    statuses = Counter(o.status for o in outcomes)
    assert n - statuses["rate_limited"] == burst, statuses
    assert statuses == {"reserved": burst, "rate_limited": n - burst}, statuses
    assert all(o.retry_after_ms > 0 for o in outcomes if o.status == "rate_limited")
    state = await snapshot(world, sale.sale_id)
    balanced(state)
    assert state["sale"]["reserved"] == burst and state["sale"]["remaining"] == 100 - burst
    assert state["buyers"] == {buyer: burst}
    assert len(state["orders"]) == burst == state["log"]


async def test_a_shared_address_lets_through_exactly_its_burst(world: World) -> None:
    """Many buyers behind one address, all at once: exactly the address's burst get through,
    none more than their own, and the stock adds up."""
    users, tries, user_burst, ip_burst = 50, 4, 3, 25
    sale = await world.add_sale(stock=1000, limit=1000)
    buyers = await world.add_users(users)
    per_user, per_ip = user_limit(burst=user_burst), ip_limit(burst=ip_burst)
    ip = "192.0.2.9"
    calls = [(b, [(per_user, b), (per_ip, ip)]) for _ in range(tries) for b in buyers]
    outcomes = await asyncio.wait_for(asyncio.gather(
        *(attempt(world.stock, sale.sale_id, b, lim) for b, lim in calls)), 30)

    passed = Counter(b for (b, _), o in zip(calls, outcomes) if o.status != "rate_limited")
    assert sum(passed.values()) == ip_burst, passed
    assert max(passed.values()) <= user_burst, passed
    assert {o.status for o in outcomes} == {"reserved", "rate_limited"}
    state = await snapshot(world, sale.sale_id)
    balanced(state)
    assert state["sale"]["reserved"] == ip_burst
    assert state["buyers"] == dict(passed)


# --- over HTTP ------------------------------------------------------------------------------------

@pytest.fixture
async def api(server: ServerProcess) -> AsyncIterator[httpx.AsyncClient]:
    async with api_client(server.url) as c:
        yield c
    await settle_tracked(server.url)


@pytest.fixture(scope="module")
async def host(server: ServerProcess) -> Actor:
    """Registered once per module (registering hashes a password: slow on purpose)."""
    async with api_client(server.url) as c:
        return await register(c, "host")


async def test_the_api_answers_429_with_retry_after_when_the_buyer_bucket_is_empty(
        api: httpx.AsyncClient, host: Actor, server: ServerProcess) -> None:
    shop = await new_shop(api, host=host)
    sale = await launch(api, shop, stock=5, per_user_limit=2)
    buyer = await guest(api, "limited")
    first = await buy(api, buyer, sale["id"], key := idem_key())
    assert first.status_code == 201, first.text

    async with open_redis(server.env["REDIS_URL"], 4) as redis:
        bucket_key = limit_key(sale["id"], PURCHASE_PER_USER.name, buyer.user_id)
        now = await redis_now_ms(redis)
        await redis.set(bucket_key, now + 60_000, px=60_000)  # as if a minute of attempts were spent
        try:
            r = await buy(api, buyer, sale["id"])
            assert_error(r, 429, "rate_limited")
            retry_after = int(r.headers["Retry-After"])
            # The bucket refills 5 a second with a burst of 10: about 58 s to wait.
            assert 50 <= retry_after <= 60, r.headers
            assert int(cast(bytes, await redis.get(bucket_key))) == now + 60_000  # the refusal spent nothing

            # Nothing changed in the sale.
            state = await get_sale(api, sale["id"])
            assert (state["remaining"], state["reserved"], state["paid"]) == (4, 1, 0), state

            # A retry of the purchase already made is answered (retries never spend).
            again = await buy(api, buyer, sale["id"], key)
            assert again.status_code == 200, again.text
            assert again.json()["order_id"] == first.json()["order_id"]

            # Another buyer is not limited by this one's bucket.
            other = await buy(api, await guest(api, "unlimited"), sale["id"])
            assert other.status_code == 201, other.text
        finally:
            await redis.delete(bucket_key)

    r = await buy(api, buyer, sale["id"])
    assert r.status_code == 201, r.text
    state = await get_sale(api, sale["id"])
    assert (state["remaining"], state["reserved"]) == (2, 3), state


async def test_the_start_is_announced_once_as_a_new_version_and_never_after_the_end(world: World) -> None:
    sale = await world.add_sale()
    v = (await sale_state(world.stock, sale.sale_id)).v
    results = await asyncio.gather(*(world.stock.mark_started(sale.sale_id) for _ in range(8)))
    assert sorted(results) == [0] * 7 + [v + 1]  # one caller of all, with the new version
    ended = await world.add_sale()
    assert await world.stock.end(ended.sale_id, "host")
    v_end = (await sale_state(world.stock, ended.sale_id)).v
    assert await world.stock.mark_started(ended.sale_id) == 0  # an end that won the race is the news
    assert (await sale_state(world.stock, ended.sale_id)).v == v_end
