"""Redis goes away and comes back: a private Valkey (AOF on, appendfsync always) under one real
`livesale serve`, stopped gracefully or killed with SIGKILL, then started again on the same data
directory and port. Nothing acknowledged is lost, the server says 503 while Redis is away (fast,
never hanging), and comes back by itself: health, stock, orders, purchases, chat and the viewers'
state (a fresh `welcome`)."""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator, Iterator

import httpx
import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus

from tests.inventory.support import (
    Shop,
    assert_balanced,
    bought,
    buy,
    get_order,
    get_sale,
    idem_key,
    launch,
    new_shop,
    paid,
)
from tests.reliability.support import Engine, LogWindow, wait_health, wait_reconciled
from tests.rooms.support import Viewer, chat_text, chat_until_heard, of_type, open_viewer, pin, tag
from tests.support import Actor, ServerProcess, api_client, backends, eventually, guest, open_redis

pytestmark = pytest.mark.reliability

OUTAGE_HTTP_TIMEOUT = 15.0  # a request during the outage must come back (with 503) within this


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    eng = Engine(tmp_path_factory.mktemp("valkey-faults"))
    eng.start()
    try:
        yield eng
    finally:
        eng.stop()


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory, engine: Engine) -> Iterator[ServerProcess]:
    with ServerProcess(tmp_path_factory.mktemp("redis-faults"), redis_url=engine.url) as proc:
        yield proc


@pytest.fixture
async def api(srv: ServerProcess, engine: Engine) -> AsyncIterator[httpx.AsyncClient]:
    async with api_client(srv.url, timeout=OUTAGE_HTTP_TIMEOUT) as c:
        yield c
    if not engine.running:  # a failed test must not leave the next one without Redis
        engine.start()


async def healthy_again(srv: ServerProcess) -> None:
    async with api_client(srv.url) as c:
        r = await wait_health(c, 200, timeout=30)
        assert r.json() == {"status": "ok", "redis": "ok", "database": "ok", "pubsub": "ok", "jobs": "ok"}


async def sale_figures(api: httpx.AsyncClient, sale_id: str) -> tuple[int, int, int, int]:
    s = await get_sale(api, sale_id)
    assert_balanced(s)
    return s["stock"], s["remaining"], s["reserved"], s["paid"]


async def until_welcome(v: Viewer, timeout: float) -> dict[str, Any] | None:
    """The next `welcome` on an open socket, or None if the server closed it instead."""
    try:
        return await v.expect(of_type("welcome"), timeout=timeout, what="a fresh welcome")
    except ConnectionClosed:
        return None


async def buy_retrying(api: httpx.AsyncClient, buyer: Actor, sale_id: str, key: str) -> httpx.Response:
    """A purchase retried with the same key while the answer is 429 (after its Retry-After) or 503, as
    a client does; bounded."""
    r = await buy(api, buyer, sale_id, key)
    for _ in range(30):
        if r.status_code not in (429, 503):
            break
        await asyncio.sleep(min(2.0, float(r.headers.get("retry-after", "1"))))
        r = await buy(api, buyer, sale_id, key)
    return r


async def purchase_when_back(api: httpx.AsyncClient, buyer: Actor, sale_id: str) -> dict[str, Any]:
    """A purchase right after Redis is back, retried with the same key while the answer is 503."""
    key = idem_key("after")

    async def attempt() -> httpx.Response | None:
        r = await buy(api, buyer, sale_id, key)
        assert r.status_code in (201, 200, 503), r.text
        return r if r.status_code in (200, 201) else None

    r: httpx.Response = await eventually(attempt, timeout=20, interval=0.5, what="a purchase after the restart")
    return dict(r.json())


@pytest.mark.parametrize("fault", ["stop", "kill"])
async def test_redis_restart_loses_nothing_and_service_resumes(srv: ServerProcess, engine: Engine,
                                                                api: httpx.AsyncClient, fault: str) -> None:
    log = LogWindow(srv)
    shop: Shop = await new_shop(api)
    r = await pin(api, shop.room_id, shop.product_id, shop.host)
    assert r.status_code == 200, r.text
    sale = await launch(api, shop, stock=20, per_user_limit=3, duration_s=3600)
    sale_id = sale["id"]
    b1, b2, b3, talker, watcher = [await guest(api, n) for n in ("b1", "b2", "b3", "talker", "watcher")]

    # Orders of every kind, some persisted to SQL, the last ones acknowledged just before the fault.
    o1 = await bought(api, b1, sale_id, quantity=2)
    o2 = await bought(api, b2, sale_id)
    await paid(api, b2, o2["order_id"])
    async with backends(srv) as (stock, db):
        await wait_reconciled(stock, db, sale_id)
    late = [await bought(api, b3, sale_id) for _ in range(2)]  # no waiting: the fault follows at once

    async with open_viewer(srv.url, shop.room_id, watcher.token, label="watcher") as v, \
            open_viewer(srv.url, shop.room_id, talker.token, label="talker") as t:
        before = [tag("before") for _ in range(3)]
        for text in before:
            await t.chat(text)
            await v.expect(chat_text(text))
        await t.like(7)
        await v.expect(lambda e: e["type"] == "likes" and e["total"] >= 7, what="likes")
        figures = await sale_figures(api, sale_id)
        assert figures == (20, 15, 4, 1), figures

        # --- the fault --------------------------------------------------------------------------------
        engine.stop() if fault == "stop" else engine.kill()
        try:
            r = await wait_health(api, 503, timeout=15)
            body = r.json()
            assert body["status"] == "unavailable" and body["redis"].startswith("error"), body
            assert body["database"] == "ok", body

            # A purchase fails fast and says so: 503 within the client's timeout, never a hang or a 500.
            r = await buy(api, b1, sale_id, idem_key("outage"))
            assert r.status_code == 503, r.text
            assert r.json()["error"] == "unavailable" and r.headers["retry-after"] == "1", r.text
            # Reads that need Redis too.
            r = await api.get(f"/api/sales/{sale_id}")
            assert r.status_code == 503, r.text
            # A connected viewer who chats is told, and keeps the socket.
            await t.chat("into the void")
            await t.expect_error("unavailable", timeout=15)
        finally:
            engine.start()  # same directory and port: replays the AOF

        # --- back --------------------------------------------------------------------------------------
        await healthy_again(srv)
        assert await sale_figures(api, sale_id) == figures
        assert (await get_order(api, b1, o1["order_id"]))["status"] == "reserved"
        assert (await get_order(api, b2, o2["order_id"]))["status"] == "paid"
        for o in late:
            got = await get_order(api, b3, o["order_id"])
            assert (got["status"], got["quantity"]) == ("reserved", 1), got
        # The per-buyer counts survived too: b3 holds 2 of 3.
        r = await buy(api, b3, sale_id, quantity=2)
        assert r.status_code == 409 and r.json()["error"] == "limit_exceeded", r.text

        # The viewer's server sends a fresh welcome once its pub/sub link is back; a client whose
        # socket was closed instead reconnects. Either way it gets the whole state back.
        welcome = await until_welcome(v, timeout=30)
        reconnected = None
        if welcome is None:
            reconnected = open_viewer(srv.url, shop.room_id, watcher.token, label="watcher again")
            v = await reconnected.__aenter__()
            welcome = v.welcome
        try:
            assert welcome is not None
            assert [e["text"] for e in welcome["history"]][-3:] == before, welcome["history"]
            assert welcome["likes"] == 7, welcome
            assert welcome["pinned_product"]["id"] == shop.product_id, welcome
            assert welcome["sale"]["id"] == sale_id and welcome["sale"]["remaining"] == 15, welcome["sale"]

            # Purchases and chat work again.
            again = await purchase_when_back(api, b1, sale_id)
            assert again["status"] == "reserved" and again["remaining"] == 14, again
            await chat_until_heard(t, v, timeout=20, wait=3, what="chat after the restart")
        finally:
            if reconnected is not None:
                await reconnected.__aexit__(None, None, None)

    # Every order, the new one included, reaches SQL: nothing lost, nothing doubled.
    async with backends(srv) as (stock, db):
        report = await wait_reconciled(stock, db, sale_id, timeout=30)
        assert report.ok, report.lines()
        assert (report.redis_orders, report.sql_orders) == (5, 5), report.lines()
    r = await api.get("/api/orders", headers=b3.auth)
    assert {o["order_id"] for o in r.json()} == {o["order_id"] for o in late}
    log.assert_clean()


async def test_anonymous_viewer_joining_during_the_outage_is_told_to_come_back(srv: ServerProcess, engine: Engine,
                                                                               api: httpx.AsyncClient) -> None:
    """protocol.md: `unavailable`, the server could not reach Redis while you joined; reconnect (1013).

    A client retries a join that fails, so this test does too, a bounded number of times."""
    shop = await new_shop(api)
    async with open_viewer(srv.url, shop.room_id, label="already here"):
        engine.kill()
        try:
            await wait_health(api, 503, timeout=15)

            async def join() -> tuple[list[dict[str, Any]], Any] | None:
                async with open_viewer(srv.url, shop.room_id, label="joiner", welcome=False) as joiner:
                    events, close = await joiner.expect_close(timeout=30)
                told = any(e["type"] == "error" and e.get("code") == "unavailable" for e in events)
                return (events, close) if told else None

            events, close = await eventually(join, timeout=30, interval=0.5, what="a join refused with 1013")
            assert [(e["type"], e.get("code")) for e in events] == [("error", "unavailable")], events
            assert close.code == 1013, close
        finally:
            engine.start()
        await healthy_again(srv)
    async with open_viewer(srv.url, shop.room_id, label="joiner, later") as later:
        assert later.welcome is not None and later.welcome["room"]["id"] == shop.room_id


async def test_logged_in_viewer_joining_during_the_outage_is_told_to_come_back(srv: ServerProcess, engine: Engine,
                                                                               api: httpx.AsyncClient) -> None:
    shop = await new_shop(api)
    viewer = await guest(api, "joiner")
    log = LogWindow(srv)
    engine.kill()
    try:
        await wait_health(api, 503, timeout=15)
        try:
            async with open_viewer(srv.url, shop.room_id, viewer.token, label="joiner", welcome=False) as joiner:
                events, close = await joiner.expect_close(timeout=30)
        except InvalidStatus as exc:  # the handshake itself was answered with an HTTP error
            raise AssertionError(f"handshake refused: {exc}") from None
        assert [(e["type"], e.get("code")) for e in events] == [("error", "unavailable")], events
        assert close is not None and close.code == 1013, close
    finally:
        engine.start()
        await healthy_again(srv)
    log.assert_clean()


async def test_a_dropped_pubsub_link_gets_viewers_a_fresh_welcome(srv: ServerProcess, engine: Engine,
                                                                  api: httpx.AsyncClient) -> None:
    shop = await new_shop(api)
    async with open_viewer(srv.url, shop.room_id, label="watcher") as v:
        async with open_redis(engine.url) as client:
            killed = await client.execute_command("CLIENT", "KILL", "TYPE", "pubsub")  # type: ignore[no-untyped-call]
        assert int(killed) >= 1  # the server's pub/sub link was cut
        welcome = await until_welcome(v, timeout=5)
        assert welcome is not None and welcome["room"]["id"] == shop.room_id


async def test_acknowledged_purchases_survive_a_redis_kill_mid_burst(srv: ServerProcess, engine: Engine,
                                                                    api: httpx.AsyncClient) -> None:
    """Purchases in flight when Redis is SIGKILLed: every one answered 201 is there after the restart,
    each exactly once; those that failed took nothing (the stock still balances)."""
    shop = await new_shop(api)
    sale = await launch(api, shop, stock=200, per_user_limit=10, duration_s=3600)
    buyers = [await guest(api, f"burst{i}") for i in range(10)]
    gate = asyncio.Event()

    async def attempt(buyer: Actor, key: str) -> tuple[Actor, str, httpx.Response | None]:
        await gate.wait()
        try:
            return buyer, key, await buy(api, buyer, sale["id"], key)
        except httpx.HTTPError:
            return buyer, key, None

    tasks = [asyncio.create_task(attempt(b, idem_key(f"k{i}"))) for b in buyers for i in range(8)]
    gate.set()
    await asyncio.sleep(0.05)
    engine.kill()
    try:
        results = await asyncio.gather(*tasks)
    finally:
        engine.start()
    await healthy_again(srv)
    acked = {(b.user_id, k): r.json()["order_id"] for b, k, r in results if r is not None and r.status_code == 201}
    for _, _, r in results:
        if r is not None:
            assert r.status_code in (201, 429, 503), r.text
    # Every attempt retried with its own key (what a client does after an error or a dropped
    # connection): an acknowledged one returns its order (200); an unanswered one either was made
    # before the kill (200, its reply was lost) or is made now (201). Never two orders for one key.
    final: dict[str, str] = {}
    for b, k, _ in results:
        again = await buy_retrying(api, b, sale["id"], k)
        assert again.status_code in (200, 201), again.text
        order_id = again.json()["order_id"]
        if (b.user_id, k) in acked:
            assert again.status_code == 200 and order_id == acked[(b.user_id, k)], again.text
        assert order_id not in final.values()
        final[k] = order_id
    s = await get_sale(api, sale["id"])
    assert_balanced(s)
    assert s["reserved"] == len(final) == len(results), s
    async with backends(srv) as (stock, db):
        assert set(await stock.orders(sale["id"])) == set(final.values())
        report = await wait_reconciled(stock, db, sale["id"], timeout=30)
        assert report.ok, report.lines()
        assert report.sql_orders == len(final), report.lines()
