"""Several jobs processes share the open sales (server/heartbeat.Members, server/inventory/watch.py):
each open sale is looked after by one live member, a new member takes an even share and moves
nothing else, and the share of a member that leaves, or stops beating, goes to the others at
their next beat. In-process, against the session Valkey; the last test runs two real `livesale
jobs` processes beside a server and has each persist its own share."""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from server import heartbeat
from server.backends.redis_client import RedisClient
from server.heartbeat import Members
from server.ids import new_id
from server.inventory.stock import Stock
from server.inventory.watch import SaleWatch
from tests.inventory.support import bought, launch, new_shop
from tests.support import (
    DB_IN_PROCESS,
    REPO,
    ServerProcess,
    api_client,
    eventually,
    guest,
    open_redis,
    redis_db_url,
)

SALES = 600


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[RedisClient]:
    async with open_redis(redis_db_url(redis_url, DB_IN_PROCESS)) as client:
        yield client


def shares(members: list[Members], sales: list[str]) -> dict[str, set[str]]:
    """Who looks after each sale, as each member sees it; every sale by exactly one."""
    taken = {m.me: {s for s in sales if m.mine(s)} for m in members}
    for s in sales:
        assert sum(s in mine for mine in taken.values()) == 1, s
    return taken


async def beat_all(members: list[Members]) -> None:
    for m in members:
        await m.beat()
    for m in members:  # the first ones beat before the last joined
        await m.beat()


async def test_members_share_the_sales_evenly_and_a_newcomer_moves_only_its_own(redis: RedisClient) -> None:
    deployment = "share-" + secrets.token_hex(4)
    sales = [new_id("sale") for _ in range(SALES)]
    a, b = Members(redis, deployment, "a"), Members(redis, deployment, "b")
    assert a.mine(sales[0])  # alone, before any beat: every sale is its own
    await beat_all([a, b])
    assert a.live == b.live == ("a", "b")
    two = shares([a, b], sales)
    assert all(SALES / 2 * 0.8 < len(mine) < SALES / 2 * 1.2 for mine in two.values()), {k: len(v) for k, v in two.items()}

    c = Members(redis, deployment, "c")
    await beat_all([a, b, c])
    three = shares([a, b, c], sales)
    assert three["a"] <= two["a"] and three["b"] <= two["b"]  # only the newcomer's share moved
    assert SALES / 3 * 0.8 < len(three["c"]) < SALES / 3 * 1.2

    await b.leave()  # a clean stop hands its share over at the others' next beat
    await beat_all([a, c])
    after = shares([a, c], sales)
    assert after["a"] >= three["a"] and after["c"] >= three["c"]


async def test_a_member_that_stops_beating_loses_its_share_after_member_stale_s(
        redis: RedisClient, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(heartbeat, "MEMBER_STALE_S", 0.5)
    deployment = "stale-" + secrets.token_hex(4)
    a, b = Members(redis, deployment, "a"), Members(redis, deployment, "b")
    await beat_all([a, b])
    assert a.live == ("a", "b")
    version = a.version
    await asyncio.sleep(0.6)  # b is silent (killed)
    await a.beat()
    assert a.live == ("a",) and a.version > version
    assert all(a.mine(new_id("sale")) for _ in range(50))


async def test_the_watch_keeps_its_share_and_takes_over_at_once_when_the_members_change(redis: RedisClient) -> None:
    deployment = "watch-" + secrets.token_hex(4)
    stock = Stock(redis, deployment)
    sales = [new_id("sale") for _ in range(200)]
    await redis.sadd(stock.open_key, *sales)
    try:
        a, b = Members(redis, deployment, "a"), Members(redis, deployment, "b")
        await beat_all([a, b])
        watch_a = SaleWatch(stock, a)
        await watch_a.refresh()
        assert watch_a.known == {s for s in sales if a.mine(s)} and 0 < len(watch_a.known) < len(sales)
        watch_a.wake(sales)  # wakes for b's sales are b's
        assert set(await watch_a.visit("sweeper")) == watch_a.known

        await b.leave()
        await a.beat()
        await watch_a.refresh()  # no REFRESH_S wait: the members changed
        assert watch_a.known == set(sales)
        assert set(await watch_a.visit("sweeper")) == set(sales)  # b's former sales, at once
    finally:
        await redis.delete(stock.open_key, heartbeat.members_key(deployment))
        stock.disconnect()


async def test_two_jobs_processes_each_persist_their_own_share(tmp_path: Path, redis_url: str) -> None:
    """A server without jobs of its own, and two `livesale jobs` beside it: orders of many sales
    all reach SQL, each sale's by one of the two, and when one is stopped the other takes over
    its sales."""
    env = {"LIVESALE_BACKGROUND_JOBS": "0", "LIVESALE_MAX_OPEN_SALES_PER_HOST": "40"}
    srv = ServerProcess(tmp_path / "srv", redis_url=redis_url, env=env)
    srv.start(ready=503)  # no jobs yet: /healthz says so
    try:
        outs = [open(tmp_path / f"jobs{i}.log", "wb") for i in range(2)]
        jobs = [subprocess.Popen([sys.executable, "-m", "server", "jobs", "--log-level", "info"], cwd=REPO,
                                 env=srv.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
                for out in outs]
        try:
            async with api_client(srv.url) as api, open_redis(srv.env["REDIS_URL"]) as redis:
                members = heartbeat.members_key(srv.deployment)

                async def both_live() -> bool:
                    return await redis.zcard(members) == 2
                await eventually(both_live, timeout=20, what="two jobs processes beating")

                async def buy_in_new_sales(n: int) -> list[tuple[object, str]]:
                    shop = await new_shop(api)
                    done = []
                    for _ in range(n):
                        shop = await new_shop(api, host=shop.host)
                        sale = await launch(api, shop, stock=3)
                        buyer = await guest(api, "b")
                        done.append((buyer, (await bought(api, buyer, sale["id"]))["order_id"]))
                    return done

                async def all_in_sql(orders: list[tuple[object, str]]) -> None:
                    async def check() -> bool:
                        for buyer, order_id in orders:
                            r = await api.get("/api/orders", headers=buyer.auth)  # type: ignore[attr-defined]
                            if order_id not in {o["order_id"] for o in r.json()}:
                                return False
                        return True
                    await eventually(check, timeout=30, what="every order in SQL")

                await all_in_sql(await buy_in_new_sales(12))

                async def both_know() -> bool:  # each has seen the other at a beat of its own
                    logs = [(tmp_path / f"jobs{i}.log").read_text() for i in range(2)]
                    return all("jobs processes of this deployment: 2" in log for log in logs)
                await eventually(both_know, timeout=10, what="each jobs process seeing the other")

                jobs[0].send_signal(signal.SIGTERM)  # a clean stop: it leaves at once
                jobs[0].wait(20)
                await all_in_sql(await buy_in_new_sales(6))
        finally:
            for p in jobs:
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGTERM)
                    p.wait(20)
            for out in outs:
                out.close()
    finally:
        srv.stop()
