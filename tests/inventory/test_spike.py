"""The purchase spike: thousands of concurrent attempts on a small stock, over real HTTP, against a
real server (one worker; one on PostgreSQL; two workers sharing Redis and SQLite; one killed with
SIGKILL mid-spike and restarted). Nothing is oversold, no buyer passes the limit, no order is made
twice, and SQL ends up holding exactly Redis's orders."""

from __future__ import annotations

import asyncio
import sys
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from server.inventory import keys
from tests.inventory.support import (
    ATTEMPTS_PER_BUYER,
    PERSIST_TIMEOUT_S,
    RECOVERY_TIMEOUT_S,
    Attempt,
    ClientPool,
    assert_balanced,
    bought,
    check_answers,
    fire,
    get_order,
    get_sale,
    idem_key,
    launch,
    new_shop,
    pending,
    plan,
    settle_tracked,
    sql_orders,
    stream_records,
    wait_persisted,
)
from tests.support import (
    DB_CRASH,
    DB_WORKERS2,
    REPO,
    ServerProcess,
    api_client,
    backends,
    eventually,
    guests,
    redis_db_url,
)

STOCK = 100
LIMIT = 2


@pytest.fixture(scope="module")
def workers2(tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> Iterator[ServerProcess]:
    """A private `livesale serve --workers 2` on the session Valkey (a database index of its own)."""
    srv = ServerProcess(tmp_path_factory.mktemp("workers2"), redis_url=redis_db_url(redis_url, DB_WORKERS2),
                        workers=2)
    srv.start()
    try:
        yield srv
    finally:
        srv.stop(timeout=10)


@pytest.fixture(autouse=True)
async def _settle(server: ServerProcess) -> AsyncIterator[None]:
    yield
    await settle_tracked(server.url)


async def run_spike(srv: ServerProcess, buyers_n: int) -> None:
    async with api_client(srv.url, connections=64) as client:
        shop = await new_shop(client)
        sale = await launch(client, shop, stock=STOCK, per_user_limit=LIMIT, price_cents=2500, duration_s=600)
        sale_id = sale["id"]
        buyers = await guests(client, buyers_n, "spike")
        attempts = plan(buyers)
        assert len(attempts) >= ATTEMPTS_PER_BUYER * buyers_n
        async with ClientPool(srv.url, clients=25, connections=40) as pool:  # 1000 connections
            await fire(pool, sale_id, attempts)
        owner = check_answers(attempts, STOCK, LIMIT)

        # Later retries of some keys that made orders: the same order, 200, no more stock taken.
        for a in attempts[::97]:
            if a.order_id is not None:
                r = await client.post(f"/api/sales/{sale_id}/purchase", json={"quantity": 1},
                                      headers={**a.buyer.auth, "Idempotency-Key": a.key})
                assert r.status_code in (200, 429), r.text
                if r.status_code == 200:
                    assert r.json()["order_id"] == a.order_id and r.json()["remaining"] == 0

        final = await get_sale(client, sale_id)
        assert_balanced(final)
        assert (final["remaining"], final["sold"], final["reserved"], final["paid"]) == (0, STOCK, STOCK, 0), final

    async with backends(srv) as (stock, db):
        assert set(await stock.orders(sale_id)) == set(owner)
        report = await wait_persisted(stock, db, sale_id)
        assert report.ok, report.lines()
        assert (report.redis_orders, report.sql_orders) == (STOCK, STOCK), report.lines()
        rows = await sql_orders(db, sale_id)
        assert set(rows) == set(owner)
        for order_id, row in rows.items():
            assert (row.status, row.quantity, row.buyer_id, row.version) == ("reserved", 1, owner[order_id], 1)

    if srv.workers == 1:
        await check_reconcile_cli(srv, sale_id)


async def check_reconcile_cli(srv: ServerProcess, sale_id: str) -> None:
    """`python -m server reconcile SALE_ID` with the server's environment agrees: exit 0, OK."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "server", "reconcile", sale_id, cwd=Path(REPO), env=srv.env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), timeout=60)
    text = out.decode()
    assert proc.returncode == 0, text
    assert f"sale {sale_id}: stock {STOCK} = remaining 0 + reserved {STOCK} + paid 0" in text, text
    assert f"in Redis {STOCK}, in SQL {STOCK}; stream entries not yet persisted 0" in text and "  OK" in text, text


async def test_spike_one_worker(server: ServerProcess) -> None:
    """2,100 attempts from 500 buyers at once on a stock of 100."""
    await run_spike(server, 500)


async def test_spike_on_postgresql(pg_server: ServerProcess) -> None:
    """The same on a server whose database is PostgreSQL (250 buyers): the persister's upserts
    and reconcile, on the other dialect."""
    try:
        await run_spike(pg_server, 250)
    finally:  # the autouse `_settle` settles the shared SQLite server's sales only
        await settle_tracked(pg_server.url)


async def test_spike_on_a_cluster(cluster_server: ServerProcess) -> None:
    """The same on a 3-master Valkey Cluster (250 buyers): the sale's scripts go, batched, to its
    slot's master; the open-sales index and the wake stream live on other slots."""
    try:
        await run_spike(cluster_server, 250)
    finally:
        await settle_tracked(cluster_server.url)


async def test_spike_two_workers(workers2: ServerProcess) -> None:
    """The same on two worker processes sharing Redis and the SQLite file (smaller: 250 buyers)."""
    await run_spike(workers2, 250)


async def test_two_sweepers_release_each_order_once(workers2: ServerProcess) -> None:
    """Both workers run a sweeper over the same sale: every unpaid order is released exactly once."""
    n = 30
    async with api_client(workers2.url) as client:
        shop = await new_shop(client)
        sale = await launch(client, shop, stock=n, per_user_limit=1, payment_timeout_s=1)
        buyers = await guests(client, n, "late")
        orders = await asyncio.gather(*(bought(client, b, sale["id"]) for b in buyers))

        async def all_back() -> dict[str, Any] | None:
            s = await get_sale(client, sale["id"])
            assert_balanced(s)
            return s if s["remaining"] == n else None

        final = await eventually(all_back, timeout=PERSIST_TIMEOUT_S, what="every order released")
        assert (final["reserved"], final["paid"]) == (0, 0)
        assert final["v"] == 1 + 2 * n  # the launch (open at once), n reservations, n releases: nothing twice
        for b, o in zip(buyers, orders):
            assert (await get_order(client, b, o["order_id"]))["status"] == "expired"

    async with backends(workers2) as (stock, db):
        history: dict[str, list[str]] = defaultdict(list)
        for rec in await stream_records(stock.redis, sale["id"]):
            history[rec["id"]].append(rec["status"])
        assert set(history) == {o["order_id"] for o in orders}
        assert all(h == ["reserved", "expired"] for h in history.values()), history
        report = await wait_persisted(stock, db, sale["id"])
        assert report.ok, report.lines()
        assert {row.status for row in (await sql_orders(db, sale["id"])).values()} == {"expired"}


@pytest.mark.slow
async def test_sigkill_mid_spike_then_restart(tmp_path: Path, redis_url: str) -> None:
    """Kill the server (SIGKILL, whole process group) while purchases are in flight, restart it on
    the same data dir, retry every unanswered attempt with the same key: every order a buyer was
    told about is in SQL once, and Redis and SQL agree.

    What the killed persister read but never acknowledged is claimed by the restarted one once it
    has been idle for CLAIM_IDLE_MS (30 s), so this test waits that long when the kill lands there."""
    srv = ServerProcess(tmp_path / "crash", redis_url=redis_db_url(redis_url, DB_CRASH))
    await asyncio.to_thread(srv.start)
    try:
        async with api_client(srv.url, connections=64) as client:
            shop = await new_shop(client)
            sale = await launch(client, shop, stock=STOCK, per_user_limit=LIMIT, duration_s=600)
            sale_id = sale["id"]
            buyers = await guests(client, 120, "crash")
        attempts = [Attempt(b, idem_key(f"c{i}a{j}")) for i, b in enumerate(buyers) for j in range(ATTEMPTS_PER_BUYER)]

        created_before = [0]
        enough = asyncio.Event()

        def on_answer(a: Attempt) -> None:
            if a.final is not None and a.final.status_code == 201:
                created_before[0] += 1
                if created_before[0] >= 25:
                    enough.set()

        async def killer() -> None:
            try:
                await asyncio.wait_for(enough.wait(), 60)
            finally:
                await asyncio.to_thread(srv.kill)

        async with ClientPool(srv.url, clients=10, connections=40) as pool:
            await asyncio.gather(fire(pool, sale_id, attempts, crash=True, on_answer=on_answer), killer())
        told_before = {a.order_id: a for a in attempts
                       if a.order_id is not None and a.final is not None and a.final.status_code == 201}
        unanswered = [a for a in attempts if a.final is None]
        assert told_before and unanswered, (len(told_before), len(unanswered))
        assert all(a.errors for a in unanswered)

        await asyncio.to_thread(srv.start)
        async with backends(srv) as (stock, db):
            left_pending = await pending(stock, sale_id)  # read by the dead persister, never acked
        async with ClientPool(srv.url, clients=4, connections=25) as pool:
            for round_ in range(20):  # bounded: retry what got no answer, or only 429 / 503, same key
                todo = [a for a in attempts if a.final is None or a.final.status_code in (429, 503)]
                if not todo:
                    break
                for a in todo:
                    a.errors.clear()
                await fire(pool, sale_id, todo)
                await asyncio.sleep(0.3 * round_)
        assert all(a.final is not None and a.final.status_code in (200, 201, 409) for a in attempts)

        known: dict[str, str] = {}
        for a in attempts:
            ids = {r.json()["order_id"] for r in a.answers if r.status_code in (200, 201)}
            assert len(ids) <= 1, f"key {a.key} made {ids}"
            if ids:
                known[ids.pop()] = a.buyer.user_id
        assert set(told_before) <= set(known)

        async with backends(srv) as (stock, db):
            state = await stock.state(sale_id)
            assert state is not None
            assert state.remaining + state.reserved + state.paid == STOCK
            assert state.remaining == 0  # demand (120 buyers x 2) was over the stock
            redis_orders = await stock.orders(sale_id)
            assert set(redis_orders) == set(known), "Redis holds orders no buyer was told about, or lost some"
            report = await wait_persisted(stock, db, sale_id, timeout=RECOVERY_TIMEOUT_S)
            assert report.ok, (report.lines(), f"{left_pending} entries were left pending by the kill")
            rows = await sql_orders(db, sale_id)
            assert set(rows) == set(known) and len(rows) == STOCK
            for order_id in told_before:
                assert rows[order_id].buyer_id == known[order_id]
            per_buyer = Counter(known.values())
            assert max(per_buyer.values()) <= LIMIT
            groups = await stock.redis.xinfo_groups(keys.log(sale_id))
            group = stock.persister_group(groups)
            assert group is not None
            assert group["pending"] == 0
    finally:
        srv.stop(timeout=10)
