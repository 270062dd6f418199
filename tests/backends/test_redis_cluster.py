"""The connection layer on a Redis Cluster (server/backends/redis_client.py, redis_nodes.py,
autopipeline.py): the REDIS_URL forms, a plain URL at a cluster node refused, health that reads
the cluster's state, scripts batched per master that follow a slot as it moves (MOVED, ASK,
TRYAGAIN) without running twice, and batches that wait for a replica when told to.

On clusters of their own (these tests move slots and stop nodes)."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot

from load.cluster import ValkeyCluster
from load.servers import free_port
from server.backends import redis_client
from server.backends.autopipeline import AutoPipeline, NotReplicated
from server.backends.embedded_valkey import EmbeddedValkey
from server.backends.redis_client import RedisClient, make_redis, parse_cluster_url
from server.backends.redis_nodes import Nodes
from server.errors import ConfigError
from tests.support import open_redis

# Counts one call (INCR of KEYS[1]) and answers with its own tag and the count it saw.
TAGGED_INCR = "local n = redis.call('INCR', KEYS[1]) return {ARGV[1], n}"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ValkeyCluster]:
    with ValkeyCluster(tmp_path_factory.mktemp("pipeline-cluster"), masters=3, replicas=1) as c:
        yield c


@pytest.fixture
async def redis(cluster: ValkeyCluster) -> AsyncIterator[RedisClient]:
    async with open_redis(cluster.url, 16) as client:
        yield client


@pytest.mark.parametrize(("url", "seeds", "tls", "user", "password"), [
    ("redis+cluster://10.0.0.1:7000,10.0.0.2:7001/", (("10.0.0.1", 7000), ("10.0.0.2", 7001)), False, None, None),
    ("rediss+cluster://app:s%3Acret@a.example:6379/0", (("a.example", 6379),), True, "app", "s:cret"),
    ("redis+cluster://:pw@[::1]:7000", (("::1", 7000),), False, None, "pw"),
])
def test_cluster_urls(url: str, seeds: tuple[tuple[str, int], ...], tls: bool, user: str | None,
                      password: str | None) -> None:
    parsed = parse_cluster_url(url)
    assert parsed is not None
    assert (parsed.seeds, parsed.tls, parsed.username, parsed.password) == (seeds, tls, user, password)


@pytest.mark.parametrize(("url", "message"), [
    ("redis://h1:6379,h2:6379/0", "redis\\+cluster://"),
    ("redis+cluster://h1:7000/3", "only database 0"),
    ("redis+cluster://h1,h2:7000/", "is not host:port"),
    ("redis+cluster://h1:port/", "is not host:port"),
])
def test_urls_a_cluster_cannot_take_are_config_errors(url: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_cluster_url(url)


def test_one_server_urls_stay_one_server() -> None:
    for url in ("redis://127.0.0.1:6379/2", "rediss://h:6380/0", "unix:///tmp/v.sock?db=0"):
        assert parse_cluster_url(url) is None


async def test_a_plain_url_at_a_cluster_node_is_refused_with_the_url_to_write(cluster: ValkeyCluster) -> None:
    async with open_redis(f"redis://127.0.0.1:{cluster.ports[0]}/0") as plain:
        with pytest.raises(ConfigError, match="redis\\+cluster://"):
            await redis_client.check_topology(plain)


async def test_health_reads_the_cluster_state(redis: RedisClient) -> None:
    assert isinstance(redis, RedisCluster)
    await redis_client.ping(redis)  # every slot served


def keys_on_every_master(nodes: Nodes, n: int = 30) -> list[str]:
    """Keys with hash tags of their own, spread so that every master serves some."""
    keys = [f"{{ap:{secrets.token_hex(4)}}}" for _ in range(n)]
    assert len({nodes.of(k) for k in keys}) == len(nodes.masters()) == 3
    return keys


async def test_calls_of_one_turn_go_to_their_masters_and_each_gets_its_answer(redis: RedisClient) -> None:
    script = redis.register_script(TAGGED_INCR)
    pipeline = AutoPipeline(redis)
    try:
        nodes = Nodes(redis)
        await nodes.learn()
        keys = keys_on_every_master(nodes)
        results = await asyncio.gather(*(pipeline.script(script, [k], [i]) for i, k in enumerate(keys)))
        assert [tag for tag, _ in results] == [str(i).encode() for i in range(len(keys))]
        assert all(n == 1 for _, n in results)
        assert len(pipeline._links) == 3  # noqa: SLF001  one link per master
    finally:
        pipeline.close()


async def test_calls_follow_a_slot_as_it_moves_and_none_runs_twice(redis: RedisClient, cluster: ValkeyCluster) -> None:
    """A steady stream of calls on keys of one slot while the slot moves to another master key by
    key: every call is answered (some after MOVED, ASK or TRYAGAIN), and the count each key
    holds is the number of calls made on it."""
    tag = "{mv:" + secrets.token_hex(4) + "}"
    keys = [f"{tag}:{i}" for i in range(40)]
    slot = key_slot(tag.encode())
    target = next(p for p in cluster.masters_ports() if p != cluster.owner(slot))
    script = redis.register_script(TAGGED_INCR)
    pipeline = AutoPipeline(redis)
    made = {k: 0 for k in keys}
    errors: list[BaseException] = []

    async def calls(rounds: int) -> None:
        for r in range(rounds):
            batch = [pipeline.script(script, [k], [r]) for k in keys]
            for k in keys:
                made[k] += 1
            errors.extend(x for x in await asyncio.gather(*batch, return_exceptions=True)
                          if isinstance(x, BaseException))
            await asyncio.sleep(0.01)

    try:
        stream = asyncio.create_task(calls(120))
        await asyncio.sleep(0.1)
        await asyncio.to_thread(cluster.migrate_slot, slot, target, batch=2, pause_s=0.05)
        await stream
        assert cluster.owner(slot) == target
        assert not errors, errors[:3]
        counts: list[Any] = [await redis.get(k) for k in keys]
        assert [int(c) for c in counts] == [made[k] for k in keys]
    finally:
        pipeline.close()


async def test_replica_acks_wait_for_the_replica_and_fail_when_it_is_gone(tmp_path: Path) -> None:
    """One master and its replica: with replica_acks=1 a call is answered once the replica has
    it; with the replica stopped, a call fails (503 upstream) but its write stands, and the next
    link, seeing no replica, stops waiting."""
    master = EmbeddedValkey(tmp_path / "master", port=free_port())
    replica = EmbeddedValkey(tmp_path / "replica", port=free_port(),
                             config=[f"replicaof 127.0.0.1 {master.port}"])
    url = master.start()
    replica.start()
    try:
        async with open_redis(url) as redis, open_redis(replica.url) as copy:
            async def synced() -> bool:
                replica_info = (await redis.info("replication")).get("slave0")
                return isinstance(replica_info, dict) and replica_info.get("state") == "online"
            for _ in range(100):
                if await synced():
                    break
                await asyncio.sleep(0.05)
            script = redis.register_script(TAGGED_INCR)
            pipeline = AutoPipeline(redis, replica_acks=1)
            try:
                k = "acks:" + secrets.token_hex(4)
                assert (await pipeline.script(script, [k], ["a"]))[1] == 1
                assert await copy.get(k) == b"1"  # on the replica before the answer came

                replica.stop()
                with pytest.raises(NotReplicated):
                    await pipeline.script(script, [k], ["b"])
                assert await redis.get(k) == b"2"  # the write stands: a retry would find it
                assert (await pipeline.script(script, [k], ["c"]))[1] == 3  # no replica now: no wait
            finally:
                pipeline.close()
    finally:
        replica.stop()
        master.stop()


async def test_make_redis_gives_a_cluster_client_for_a_cluster_url(cluster: ValkeyCluster) -> None:
    client = make_redis(cluster.url, 4)
    try:
        assert isinstance(client, RedisCluster)
        assert await client.set("{k}:made", 1)
    finally:
        await redis_client.close(client)
