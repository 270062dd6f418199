"""A live sale on a Redis Cluster while the cluster changes under it: the sale's and the room's
slots migrated to another master mid-spike (CLUSTER SETSLOT ... MIGRATING/IMPORTING, MIGRATE),
and the sale's master killed mid-spike and replaced by its replica. Every answer is an order or
a refusal (503 while the cluster moves, never a 500), nothing is oversold, no acknowledged order
is lost, SQL ends up with exactly Redis's orders, and the room's viewers still get its events.

Each test has a cluster of its own (3 masters, a replica each), which it changes."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from redis.crc import key_slot

from load.cluster import ValkeyCluster
from load.servers import healthy
from server.inventory import keys
from server.rooms import keys as room_keys
from tests.inventory.support import (
    Attempt,
    ClientPool,
    assert_balanced,
    check_answers,
    fire,
    get_sale,
    idem_key,
    launch,
    new_shop,
    settle_tracked,
    sql_orders,
    wait_persisted,
)
from tests.rooms.support import chat_until_heard, open_viewer
from tests.support import ServerProcess, api_client, backends, eventually, guest, guests

pytestmark = pytest.mark.reliability

STOCK = 120
BUYERS = 240  # one attempt each, limit 1: half get an order, half hear `sold_out`
SPREAD_S = 5.0  # the attempts start over this long: the cluster changes while they come


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[ValkeyCluster]:
    with ValkeyCluster(tmp_path / "cluster", masters=3, replicas=1) as c:
        yield c


@pytest.fixture
def srv(tmp_path: Path, cluster: ValkeyCluster) -> Iterator[ServerProcess]:
    # An order is acknowledged once a replica has it too: a failover then never loses one.
    with ServerProcess(tmp_path / "srv", redis_url=cluster.url, env={"LIVESALE_REDIS_REPLICA_ACKS": "1"}) as s:
        yield s


def slot_of(key: str) -> int:
    return int(key_slot(key.encode()))


async def spike_while(srv: ServerProcess, change: Callable[[str, str], None]) -> None:
    """A spike on a fresh sale while `change(sale_id, room_id)` runs in a thread; then the checks,
    and that the change did happen while purchases were being answered."""
    async with api_client(srv.url, connections=64) as client:
        shop = await new_shop(client)
        sale = await launch(client, shop, stock=STOCK, per_user_limit=1, duration_s=600)
        sale_id = sale["id"]
        buyers = await guests(client, BUYERS, "mv")
        attempts = [Attempt(b, idem_key(f"mv{i}")) for i, b in enumerate(buyers)]
        talker = await guest(client, "talker")
        async with open_viewer(srv.url, shop.room_id, talker.token) as viewer, \
                ClientPool(srv.url, clients=8, connections=32) as pool:
            answered: list[float] = []
            window: list[float] = []

            def timed_change() -> None:
                time.sleep(SPREAD_S / 5)  # the first buyers are served before the change
                window.append(time.monotonic())
                change(sale_id, shop.room_id)
                window.append(time.monotonic())
            changing = asyncio.create_task(asyncio.to_thread(timed_change))
            await fire(pool, sale_id, attempts, spread_s=SPREAD_S, on_answer=lambda _: answered.append(time.monotonic()))
            await changing
            during = sum(window[0] <= t <= window[1] for t in answered)
            assert during >= 10, f"only {during} answers while the cluster changed"
            owner = check_answers(attempts, STOCK, 1)  # no 500, nothing oversold, one order per key

            # The room's events still reach its viewers, through the channel's node of now.
            await chat_until_heard(viewer, viewer, timeout=30, what="a chat message after the change")

        final = await get_sale(client, sale_id)
        assert_balanced(final)
        assert (final["remaining"], final["sold"]) == (0, STOCK), final

    async with backends(srv) as (stock, db):
        assert set(await stock.orders(sale_id)) == set(owner)  # every acknowledged order is there
        report = await wait_persisted(stock, db, sale_id)
        assert report.ok, report.lines()
        assert set(await sql_orders(db, sale_id)) == set(owner)
    await settle_tracked(srv.url)


async def test_a_sale_and_its_room_migrated_to_another_master_mid_spike(
        srv: ServerProcess, cluster: ValkeyCluster) -> None:
    def migrate(sale_id: str, room_id: str) -> None:
        for slot in (slot_of(keys.sale(sale_id)), slot_of(room_keys.channel(room_id))):
            target = next(p for p in cluster.masters_ports() if p != cluster.owner(slot))
            # A few keys at a time, with pauses: the slot stays half-moved for seconds.
            moved = cluster.migrate_slot(slot, target, batch=2, pause_s=0.1)
            assert moved > 0 and cluster.owner(slot) == target

    await spike_while(srv, migrate)
    assert healthy(srv.url)


async def test_the_sales_master_killed_mid_spike_and_replaced_by_its_replica(
        srv: ServerProcess, cluster: ValkeyCluster) -> None:
    def fail_over(sale_id: str, room_id: str) -> None:
        slot = slot_of(keys.sale(sale_id))
        dead = cluster.owner(slot)
        cluster.kill(dead)
        cluster.wait_ok(timeout_s=30)  # the replica is elected and every slot served again
        assert cluster.owner(slot) != dead

    await spike_while(srv, fail_over)

    async def serving() -> bool:
        return await asyncio.to_thread(healthy, srv.url)
    await eventually(serving, timeout=30, what="/healthz 200 after the failover")
