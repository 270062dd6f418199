"""What open sales cost the jobs process, and how many one host may hold: an idle open sale is
visited when something happens to it or its own deadline comes (server/inventory/watch.py),
not polled several times a second (2,000 idle week-long sales had the jobs process at 73% of a
core), and a host past LIVESALE_MAX_OPEN_SALES_PER_HOST open sales gets 409."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from redis.asyncio import Redis

from server.inventory.watch import IDLE_S
from tests.inventory.support import Shop, bought, end_sale, launch, launch_raw, new_shop
from tests.support import ServerProcess, api_client, assert_error, create_room, eventually, guest, open_redis

IDLE_SALES = 150


async def commands(redis: Redis) -> int:
    return int((await redis.info("stats"))["total_commands_processed"])


async def engine_rate(redis: Redis, seconds: float) -> float:
    """Commands a second the engine processed over `seconds` (its own INFO calls are two)."""
    before = await commands(redis)
    await asyncio.sleep(seconds)
    return (await commands(redis) - before - 1) / seconds


async def test_idle_open_sales_cost_the_jobs_process_next_to_nothing(tmp_path: Path) -> None:
    """A private engine, so that every command it counts is this server's: 150 idle week-long
    sales open add under 0.4 commands a second each, over a whole round of the visits that
    come anyway (each used to add 17); a purchase in another sale still reaches SQL at once."""
    env = {"LIVESALE_MAX_OPEN_SALES_PER_HOST": str(IDLE_SALES + 1)}
    with ServerProcess(tmp_path, redis_url=None, env=env) as srv:
        async with api_client(srv.url) as api, open_redis(f"unix://{tmp_path}/redis/valkey.sock") as redis:
            shop = await new_shop(api)
            await asyncio.sleep(2)
            quiet = await engine_rate(redis, 5)
            sem = asyncio.Semaphore(8)

            async def idle_sale() -> None:
                async with sem:
                    room = await create_room(api, shop.host, title="idle")
                    await launch(api, Shop(shop.host, room["id"], shop.product_id), duration_s=7 * 24 * 3600)

            await asyncio.gather(*(idle_sale() for _ in range(IDLE_SALES)))
            await asyncio.sleep(2)  # past the visits their launch woke
            busy = await engine_rate(redis, IDLE_S + 1)  # a whole round of the visits that come anyway
            per_sale = (busy - quiet) / IDLE_SALES
            assert per_sale < 0.4, f"{per_sale:.2f} commands/s per idle sale ({quiet:.0f}/s with none, {busy:.0f}/s)"

            sale = await launch(api, shop, stock=5)
            buyer = await guest(api, "buyer")
            order = await bought(api, buyer, sale["id"])

            async def in_sql() -> bool:
                r = await api.get("/api/orders", headers=buyer.auth)
                return r.status_code == 200 and any(o["order_id"] == order["order_id"] for o in r.json())

            await eventually(in_sql, timeout=5, what="the order in SQL")


@pytest.fixture
async def capped(tmp_path: Path, redis_url: str) -> AsyncIterator[httpx.AsyncClient]:
    with ServerProcess(tmp_path, redis_url=redis_url, env={"LIVESALE_MAX_OPEN_SALES_PER_HOST": "3"}) as srv:
        async with api_client(srv.url) as api:
            yield api


async def test_a_host_may_hold_a_bounded_number_of_open_sales(capped: httpx.AsyncClient) -> None:
    api = capped
    first = await new_shop(api)
    shops = [first] + [await new_shop(api, host=first.host) for _ in range(3)]
    sales = [await launch(api, shop) for shop in shops[:3]]
    r = await launch_raw(api, shops[3])
    assert_error(r, 409, "too_many_open_sales")
    other = await new_shop(api)  # another host's count is its own
    await launch(api, other)
    await end_sale(api, shops[0], sales[0]["id"])

    async def launched() -> bool:  # once the end reached SQL, where launches count
        return (await launch_raw(api, shops[3])).status_code == 201

    await eventually(launched, timeout=10, what="a launch after one sale ended")
