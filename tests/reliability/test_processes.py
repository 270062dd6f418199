"""Two `livesale serve` processes on one data dir (one SQLite file) and one Redis database: a process
killed outright, a viewer who reconnects, the database locked for a while under a stream of
purchases, and the limits that must hold across processes and connections (per-buyer limit, rate
limits per user and per address, like frames, logout).

A exempts 127.0.0.1 from per-address limits (as ServerProcess does by default); B does not, so the
per-address limits are tried on B while accounts are made on A.
"""

from __future__ import annotations

import asyncio
import email.utils
import secrets
import sqlite3
import time
from collections import Counter
from typing import Any, AsyncIterator, Iterator

import httpx
import pytest
from websockets.exceptions import ConnectionClosed

from server.inventory.keys import limit as limit_key
from server.ratelimit import PURCHASE_PER_IP
from server.rooms.protocol import MAX_LIKE_FRAMES_PER_S
from tests.inventory.support import (
    assert_balanced,
    bought,
    buy,
    get_sale,
    idem_key,
    launch,
    launch_raw,
    new_shop,
    paid,
    redis_now_ms,
)
from tests.reliability.support import LogWindow, clients, wait_reconciled
from tests.rooms.support import Viewer, chat_text, open_viewer, pin, stats, tag
from tests.support import (
    DB_PAIR,
    PASSWORD,
    ServerProcess,
    api_client,
    backends,
    bearer,
    eventually,
    guest,
    open_redis,
    redis_db_url,
    register,
)

pytestmark = pytest.mark.reliability


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    data_dir = tmp_path_factory.mktemp("pair")
    url = redis_db_url(redis_url, DB_PAIR)
    a = ServerProcess(data_dir, redis_url=url)
    b = ServerProcess(data_dir, redis_url=url, env={"LIVESALE_RATE_LIMIT_EXEMPT_IPS": ""})
    with a, b:
        yield a, b


@pytest.fixture(scope="module")
async def apis(pair: tuple[ServerProcess, ServerProcess]) -> AsyncIterator[tuple[httpx.AsyncClient, httpx.AsyncClient]]:
    async with api_client(pair[0].url) as a, api_client(pair[1].url) as b:
        yield a, b


@pytest.fixture(scope="module")
def logs(pair: tuple[ServerProcess, ServerProcess]) -> tuple[LogWindow, LogWindow]:
    return LogWindow(pair[0]), LogWindow(pair[1])


# --- a viewer who reconnects --------------------------------------------------------------------------

async def test_a_reconnecting_viewer_gets_what_it_missed(pair: tuple[ServerProcess, ServerProcess],
                                                         apis: tuple[httpx.AsyncClient, httpx.AsyncClient]) -> None:
    a, b = pair
    api_a, api_b = apis
    shop = await new_shop(api_a)
    away, talker_a, talker_b = [await guest(api_a, n) for n in ("away", "talkerA", "talkerB")]
    async with open_viewer(b.url, shop.room_id, away.token, label="away") as v:
        first = tag("first")
        await v.chat(first)
        await v.expect(chat_text(first))
        likes_before = v.welcome["likes"] if v.welcome else 0
    # While it is away: chat on both processes, likes on both.
    missed = []
    async with open_viewer(a.url, shop.room_id, talker_a.token, label="talker A") as ta, \
            open_viewer(b.url, shop.room_id, talker_b.token, label="talker B") as tb:
        for i in range(3):
            for t in (ta, tb):
                text = tag(f"missed{i}")
                await t.chat(text)
                await ta.expect(chat_text(text))
                missed.append(text)
        await ta.like(5)
        await tb.like(6)

        async def likes_counted() -> int | None:
            n = (await stats(api_a, shop.room_id, shop.host))["likes"]
            return n if n == likes_before + 11 else None

        await eventually(likes_counted, timeout=15, what="likes counted")
    # Back, on the other process: the welcome holds everything it missed.
    async with open_viewer(a.url, shop.room_id, away.token, label="back") as back:
        assert back.welcome is not None
        history = [e["text"] for e in back.welcome["history"]]
        assert history == [first] + missed, history
        assert back.welcome["likes"] == likes_before + 11
        assert back.welcome["you"]["user_id"] == away.user_id


# --- a process killed ---------------------------------------------------------------------------------

async def test_viewers_of_a_killed_process_get_the_room_back_on_the_other(
        pair: tuple[ServerProcess, ServerProcess], apis: tuple[httpx.AsyncClient, httpx.AsyncClient]) -> None:
    a, b = pair
    api_a, api_b = apis
    shop = await new_shop(api_a)
    r = await pin(api_a, shop.room_id, shop.product_id, shop.host)
    assert r.status_code == 200, r.text
    sale = await launch(api_a, shop, stock=30, per_user_limit=2)
    buyer, fan, talker = [await guest(api_a, n) for n in ("buyer", "fan", "talker")]
    await bought(api_a, buyer, sale["id"], quantity=2)
    said = []
    async with open_viewer(a.url, shop.room_id, fan.token, label="fan on A") as fa, \
            open_viewer(a.url, shop.room_id, label="anonymous on A") as anon, \
            open_viewer(b.url, shop.room_id, talker.token, label="talker on B") as tb:
        for i in range(3):
            said.append(tag(f"said{i}"))
            await tb.chat(said[-1])
            await fa.expect(chat_text(said[-1]))
        await fa.like(9)
        await anon.expect(lambda e: e["type"] == "likes" and e["total"] == 9, what="likes 9")

        a.kill()  # SIGKILL to A's process group: no close frames, no cleanup
        for v in (fa, anon):
            with pytest.raises(ConnectionClosed):
                await v.expect(lambda e: False, timeout=15, what="the connection to drop")

        # The clients reconnect, to B: the welcome has the whole room back.
        async with open_viewer(b.url, shop.room_id, fan.token, label="fan on B") as fb, \
                open_viewer(b.url, shop.room_id, label="anonymous on B") as anon_b:
            for w in (fb.welcome, anon_b.welcome):
                assert w is not None
                assert [e["text"] for e in w["history"]] == said, w["history"]
                assert w["likes"] == 9
                assert w["pinned_product"]["id"] == shop.product_id
                assert w["sale"]["id"] == sale["id"] and w["sale"]["remaining"] == 28, w["sale"]
                assert w["room"]["status"] == "live"
            # And the room goes on: chat and purchases on B.
            await tb.chat("still live")
            await fb.expect(chat_text("still live"))
            o = await bought(api_b, fan, sale["id"])
            await fb.expect(lambda e: e["type"] == "sale_update" and e["remaining"] == 27, what="sale_update")
            assert o["remaining"] == 27

    # A comes back on the same port and data dir and serves the same room.
    a.start()
    async with open_viewer(a.url, shop.room_id, label="on A again") as again:
        assert again.welcome is not None and again.welcome["sale"]["remaining"] == 27
    assert_balanced(await get_sale(api_a, sale["id"]))


# --- the database away for a while --------------------------------------------------------------------

async def test_purchases_go_on_while_the_database_is_locked_and_sql_catches_up(
        pair: tuple[ServerProcess, ServerProcess], apis: tuple[httpx.AsyncClient, httpx.AsyncClient],
        logs: tuple[LogWindow, LogWindow]) -> None:
    a, b = pair
    api_a, api_b = apis
    shop = await new_shop(api_a)
    sale = await launch(api_a, shop, stock=50, per_user_limit=4)
    buyers = [await guest(api_a, f"locked{i}") for i in range(6)]
    unlaunched = await new_shop(api_a)
    db_path = a.data_dir / "livesale.db"

    # Another program takes SQLite's write lock and keeps it (BEGIN EXCLUSIVE; the server waits
    # busy_timeout = 10 s for it, then fails the write).
    lock = sqlite3.connect(db_path, timeout=30, isolation_level=None, check_same_thread=False)
    try:
        await asyncio.to_thread(lock.execute, "BEGIN EXCLUSIVE")
        # A write through the API waits for the lock and then answers 503 (never a 500, never a hang).
        probe = asyncio.create_task(api_a.post("/api/products", json={"name": "Blocked", "price_cents": 100,
                                                                     "commission_rate_bp": 0},
                                               headers=shop.host.auth))
        # So does a launch, which leaves no sale behind: a sale in Redis but not in SQL could be
        # announced and sold by the jobs process, and its orders never reach SQL.
        launching = asyncio.create_task(launch_raw(api_b, unlaunched, stock=5, starts_in_s=0))
        # Purchases touch only Redis: all go through, on both processes, and so does paying.
        orders: dict[str, list[dict[str, Any]]] = {}
        for i, buyer in enumerate(buyers):
            api = api_a if i % 2 == 0 else api_b
            orders[buyer.user_id] = [await bought(api, buyer, sale["id"]), await bought(api, buyer, sale["id"], quantity=2)]
            await paid(api, buyer, orders[buyer.user_id][0]["order_id"])
        r = await asyncio.wait_for(probe, 60)
        assert r.status_code == 503 and r.json()["error"] == "unavailable", r.text
        assert r.headers["retry-after"] == "1"
        r = await asyncio.wait_for(launching, 60)
        assert r.status_code == 503 and r.json()["error"] == "unavailable", r.text
        # Reading SQL still works (WAL), and shows none of the new orders yet: the persister is held up.
        r = await api_b.get("/api/orders", headers=buyers[0].auth)
        assert r.status_code == 200 and r.json() == [], r.text
        s = await get_sale(api_b, sale["id"])
        assert (s["remaining"], s["reserved"], s["paid"]) == (50 - 18, 6 * 2, 6), s
    finally:
        lock.execute("ROLLBACK")
        lock.close()

    # Released: the persister retries and SQL catches up with Redis, order by order.
    async with backends(a) as (stock, db):
        report = await wait_reconciled(stock, db, sale["id"], timeout=40)
        assert report.ok, report.lines()
        assert (report.redis_orders, report.sql_orders) == (12, 12), report.lines()
        states = [await stock.state(sale_id) for sale_id in await stock.open_sales()]
        assert unlaunched.room_id not in {s.room_id for s in states if s is not None}
    r = await api_a.get(f"/api/rooms/{unlaunched.room_id}/sales")
    assert r.status_code == 200 and r.json() == [], r.text
    for buyer in buyers:
        r = await api_a.get("/api/orders", headers=buyer.auth)
        got = {o["order_id"]: o["status"] for o in r.json()}
        mine = orders[buyer.user_id]
        assert got == {mine[0]["order_id"]: "paid", mine[1]["order_id"]: "reserved"}, got
    # The host's commission for the paid orders reached the ledger too.
    r = await api_a.get("/api/me/earnings", headers=shop.host.auth)
    assert len(r.json()["entries"]) == 6, r.text
    for log in logs:
        log.assert_clean()


# --- scalpers ---------------------------------------------------------------------------------------------

async def test_per_buyer_limit_holds_for_one_person_on_many_connections_and_processes(
        pair: tuple[ServerProcess, ServerProcess], apis: tuple[httpx.AsyncClient, httpx.AsyncClient]) -> None:
    """One account, 20 HTTP clients with a connection each (10 per process), 3 keys each, all at once:
    exactly the per-buyer limit is sold to it; the rest is refused (limit or the per-user rate limit)."""
    a, b = pair
    shop = await new_shop(apis[0])
    sale = await launch(apis[0], shop, stock=100, per_user_limit=3)
    scalper = await guest(apis[0], "scalper")
    gate = asyncio.Event()
    async with clients(a.url, 10) as on_a, clients(b.url, 10) as on_b:
        async def attempt(c: httpx.AsyncClient, i: int) -> httpx.Response:
            await gate.wait()
            return await buy(c, scalper, sale["id"], idem_key(f"scalp{i}"))

        tasks = [asyncio.create_task(attempt(c, i)) for i, c in enumerate((on_a + on_b) * 3)]
        await asyncio.sleep(0)
        started = time.monotonic()
        gate.set()
        results = await asyncio.gather(*tasks)
        elapsed = time.monotonic() - started
    codes = Counter((r.status_code, r.json()["error"] if r.status_code >= 400 else "") for r in results)
    assert codes[(201, "")] == 3, codes
    assert set(codes) <= {(201, ""), (409, "limit_exceeded"), (429, "rate_limited")}, codes
    # The per-user rate limit (5 a second, burst 10) held across both processes as well.
    passed = sum(n for (status, _), n in codes.items() if status != 429)
    assert 10 <= passed <= 10 + 1 + int(5 * elapsed), (codes, elapsed)
    for r in results:
        if r.status_code == 429:
            assert int(r.headers["retry-after"]) >= 1, r.headers
    s = await get_sale(apis[1], sale["id"])
    assert (s["reserved"], s["remaining"]) == (3, 97), s


async def test_a_purchase_before_the_start_is_refused_by_the_servers_clock(
        pair: tuple[ServerProcess, ServerProcess], apis: tuple[httpx.AsyncClient, httpx.AsyncClient]) -> None:
    shop = await new_shop(apis[0])
    sale = await launch(apis[0], shop, starts_in_s=3600, duration_s=600)
    assert sale["status"] == "scheduled"
    early = await guest(apis[0], "early bird")
    tomorrow = email.utils.formatdate(time.time() + 2 * 3600 + 86400, usegmt=True)
    for api in apis:
        for headers in ({}, {"Date": tomorrow}, {"X-Client-Time": str(int(time.time() * 1000) + 7_200_000)}):
            r = await api.post(f"/api/sales/{sale['id']}/purchase", json={"quantity": 1},
                               headers={**early.auth, "Idempotency-Key": idem_key(), **headers})
            assert r.status_code == 409 and r.json()["error"] == "not_started", r.text
        # A body claiming a time is not even accepted.
        r = await api.post(f"/api/sales/{sale['id']}/purchase", json={"quantity": 1, "now": sale["starts_at_ms"]},
                           headers={**early.auth, "Idempotency-Key": idem_key()})
        assert r.status_code == 422, r.text
    s = await get_sale(apis[1], sale["id"])
    assert (s["remaining"], s["reserved"]) == (10, 0), s


# --- rate limits across processes and per address --------------------------------------------------------

async def test_purchases_are_limited_per_address_where_not_exempt(
        pair: tuple[ServerProcess, ServerProcess], apis: tuple[httpx.AsyncClient, httpx.AsyncClient]) -> None:
    """200 purchase attempts a second per address (burst 400). Sustaining that over loopback is more than
    this machine does, so the address's bucket is set as a NAT's worth of buyers would leave it; the
    server has to refuse on B (no exemption) and let A (127.0.0.1 exempt) through."""
    a, b = pair
    shop = await new_shop(apis[0])
    sale = await launch(apis[0], shop, stock=10, per_user_limit=5)
    buyer = await guest(apis[0], "behind a NAT")
    async with open_redis(a.env["REDIS_URL"]) as redis:
        now = await redis_now_ms(redis)
        bucket = limit_key(sale["id"], PURCHASE_PER_IP.name, "127.0.0.1")
        await redis.set(bucket, now + 60_000, px=60_000)
        try:
            r = await buy(apis[1], buyer, sale["id"])
            assert r.status_code == 429 and r.json()["error"] == "rate_limited", r.text
            assert 30 <= int(r.headers["retry-after"]) <= 61, r.headers
            r = await buy(apis[0], buyer, sale["id"])
            assert r.status_code == 201, r.text
        finally:
            await redis.delete(bucket)
    r = await buy(apis[1], buyer, sale["id"])
    assert r.status_code == 201, r.text


async def test_logins_are_limited_per_address(pair: tuple[ServerProcess, ServerProcess],
                                              apis: tuple[httpx.AsyncClient, httpx.AsyncClient]) -> None:
    """10 logins at once per address, then one every 5 s, with Retry-After; on B (no exemption)."""
    user = await register(apis[0], "viewer", password=PASSWORD)
    body = {"username": user.username, "password": PASSWORD}
    started = time.monotonic()
    results = await asyncio.gather(*(apis[1].post("/api/auth/login", json=body) for _ in range(15)))
    elapsed = time.monotonic() - started
    codes = Counter(r.status_code for r in results)
    assert set(codes) <= {200, 429}, codes
    # The burst, plus at most what refilled while the requests were in flight.
    assert codes[200] <= 10 + 1 + int(elapsed / 5), (codes, elapsed)
    assert codes[429] >= 1, codes
    for r in results:
        if r.status_code == 429:
            assert r.json()["error"] == "rate_limited" and r.json()["message"], r.text
            assert 1 <= int(r.headers["retry-after"]) <= 5, r.headers
    # A exempts this address: its logins are not limited by what B counted.
    for _ in range(3):
        r = await apis[0].post("/api/auth/login", json=body)
        assert r.status_code == 200, r.text


async def test_guessing_one_password_from_many_addresses_is_limited_per_account(
        pair: tuple[ServerProcess, ServerProcess], apis: tuple[httpx.AsyncClient, httpx.AsyncClient]) -> None:
    """30 tries per account, then one every 2 s, whatever the addresses (here as the proxy on 127.0.0.1
    reports them), also when they all come at once (the account's bucket was once only checked before
    the password was, and spent after a failure: 120 tries at once all got their answer). Past that,
    each address new to the account has one try (so that a crowd cannot keep the owner out, below);
    an address that has been guessing waits, with the right password too."""
    user = await register(apis[0], "viewer", password=PASSWORD)
    addresses = [f"198.51.100.{i + 1}" for i in range(40)]
    started = time.monotonic()
    answers = await asyncio.gather(*(
        apis[1].post("/api/auth/login", json={"username": user.username, "password": f"guess {i}"},
                     headers={"X-Forwarded-For": addresses[i % 40]}) for i in range(120)))
    elapsed = time.monotonic() - started
    codes = Counter(r.status_code for r in answers)
    assert set(codes) == {401, 429} and 30 <= codes[401] <= 30 + 40 + 1 + int(elapsed / 2), (codes, elapsed)
    assert all(int(r.headers["retry-after"]) <= 10 for r in answers if r.status_code == 429)
    right = await asyncio.gather(*(
        apis[1].post("/api/auth/login", json={"username": user.username, "password": PASSWORD},
                     headers={"X-Forwarded-For": address}) for address in addresses[:8]))
    # The right one waits too (but for what the account's bucket refilled meanwhile).
    assert 429 in {r.status_code for r in right}, [r.status_code for r in right]


async def test_guesses_from_a_crowd_of_addresses_never_lock_the_owner_out(
        pair: tuple[ServerProcess, ServerProcess], apis: tuple[httpx.AsyncClient, httpx.AsyncClient]) -> None:
    """Two addresses spend their whole bursts at one account, then 35 more guess once each (35 wrong
    passwords from 35 addresses used to lock the owner out: 429 for the right password): the owner,
    from addresses that have not been guessing, still logs in, on twelve devices."""
    user = await register(apis[0], "viewer", password=PASSWORD)
    for attacker in ("203.0.113.7", "203.0.113.8"):
        codes = Counter()
        for _ in range(11):  # the address's burst of 10, then its own limit
            r = await apis[1].post("/api/auth/login", json={"username": user.username, "password": "guess"},
                                   headers={"X-Forwarded-For": attacker})
            codes[r.status_code] += 1
        assert codes == Counter({401: 10, 429: 1}), codes
    crowd = await asyncio.gather(*(
        apis[1].post("/api/auth/login", json={"username": user.username, "password": f"guess {i}"},
                     headers={"X-Forwarded-For": f"203.0.114.{i + 1}"}) for i in range(35)))
    assert {r.status_code for r in crowd} == {401}
    for i in range(12):
        r = await apis[1].post("/api/auth/login", json={"username": user.username, "password": PASSWORD},
                               headers={"X-Forwarded-For": f"192.0.2.{i + 1}"})
        assert r.status_code == 200, r.text
        r = await apis[1].post("/api/auth/login", json={"username": user.username, "password": PASSWORD},
                               headers={"X-Forwarded-For": f"192.0.2.{i + 1}"})
        assert r.status_code == 200, r.text  # and again: a login leaves its address new to the account


async def test_an_ipv6_client_is_limited_by_its_64_not_per_address(
        pair: tuple[ServerProcess, ServerProcess], apis: tuple[httpx.AsyncClient, httpx.AsyncClient]) -> None:
    """Guest sign-ups: 20 at once per address; every address of one /64 is one client's."""
    prefix = "2001:db8:%x:%x" % (secrets.randbelow(1 << 16), secrets.randbelow(1 << 16))
    codes: Counter[int] = Counter()
    started = time.monotonic()
    for i in range(30):
        r = await apis[1].post("/api/auth/guest", json={"name": f"six{i}"},
                               headers={"X-Forwarded-For": f"{prefix}::{i + 1:x}"})
        codes[r.status_code] += 1
    elapsed = time.monotonic() - started
    # The burst, plus at most what refilled meanwhile (one every 2 s); one address each would pass all.
    assert set(codes) == {201, 429} and codes[201] <= 20 + 1 + int(elapsed / 2), (codes, elapsed)
    r = await apis[1].post("/api/auth/guest", json={"name": "next door"},
                           headers={"X-Forwarded-For": f"{prefix[:-1]}{'0' if prefix[-1] != '0' else '1'}::1"})
    assert r.status_code == 201, r.text  # another /64 is another client


async def test_like_frames_per_user_hold_across_processes(pair: tuple[ServerProcess, ServerProcess],
                                                          apis: tuple[httpx.AsyncClient, httpx.AsyncClient]) -> None:
    """One user's like frames spend from one bucket across all connections and processes: at most
    a burst of 20, then 20 a second, with no window edge to double it (taps in frames over that
    are dropped). The user sends 15 frames of 50 taps on A and 15 on B at once."""
    a, b = pair
    shop = await new_shop(apis[0])
    liker = await guest(apis[0], "liker")
    before = (await stats(apis[0], shop.room_id, shop.host))["likes"]
    async with open_viewer(a.url, shop.room_id, liker.token, label="A") as va, \
            open_viewer(b.url, shop.room_id, liker.token, label="B") as vb:
        started = time.monotonic()

        async def burst(v: Viewer) -> None:
            for _ in range(15):
                await v.send('{"type": "like", "count": 50}')

        await asyncio.gather(burst(va), burst(vb))
        for v in (va, vb):
            await v.ping()  # every frame read and counted by its process

        async def settled() -> int | None:
            first = (await stats(apis[0], shop.room_id, shop.host))["likes"]
            await asyncio.sleep(0.3)
            second = (await stats(apis[0], shop.room_id, shop.host))["likes"]
            return second if first == second and second > before else None

        total = await eventually(settled, timeout=10, what="likes settled")
        elapsed = time.monotonic() - started
    frames = (total - before) / 50
    # The whole burst passes; past it, only what the rate refilled while the frames came in.
    assert frames == int(frames) and MAX_LIKE_FRAMES_PER_S <= frames <= MAX_LIKE_FRAMES_PER_S * (1 + elapsed), \
        (frames, elapsed)


# --- sessions across processes ------------------------------------------------------------------------------

async def test_logout_closes_the_sessions_sockets_in_every_process(
        pair: tuple[ServerProcess, ServerProcess], apis: tuple[httpx.AsyncClient, httpx.AsyncClient]) -> None:
    a, b = pair
    shop = await new_shop(apis[0])
    user = await register(apis[0], "viewer", password=PASSWORD)
    r = await apis[0].post("/api/auth/login", json={"username": user.username, "password": PASSWORD})
    assert r.status_code == 200, r.text
    other_session = r.json()["token"]
    async with open_viewer(a.url, shop.room_id, user.token, label="session 1 on A") as s1a, \
            open_viewer(b.url, shop.room_id, cookie=user.token, origin=b.url, label="session 1 on B") as s1b, \
            open_viewer(a.url, shop.room_id, other_session, label="session 2 on A") as s2:
        # Logged out through B, by cookie from B's own origin (a cookie write needs it).
        r = await apis[1].post("/api/auth/logout", headers={"Cookie": f"livesale_session={user.token}",
                                                           "Origin": b.url})
        assert r.status_code == 200, r.text
        for v in (s1a, s1b):
            _, close = await v.expect_close(timeout=10)
            assert close is not None and close.code == 4401, (v.label, close)
        await s2.ping()
        for api in apis:
            r = await api.get("/api/me", headers=user.auth)
            assert r.status_code == 401 and r.json()["error"] == "session_revoked", r.text
            assert (await api.get("/api/me", headers=bearer(other_session))).status_code == 200
