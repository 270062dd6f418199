"""Which Redis node serves a key, and connections of one's own to a node: for the two users of
Redis that bypass the shared client's routing, the auto-pipeline (a connection per node, for
its batches) and the room broker (a pub/sub connection per node, for the channels it owns).

A plain Redis is one node. A cluster's nodes and slots are the shared RedisCluster client's view,
refreshed when a reply says it is stale (MOVED, a lost node); refreshes asked at once are one.
"""

from __future__ import annotations

from typing import Any

from redis.asyncio import ConnectionPool, Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import SlotNotCoveredError

from server.backends.redis_client import CONNECT_TIMEOUT_S, RedisClient

ONE_NODE = "redis"  # the name of a plain Redis's only node


class Nodes:
    def __init__(self, client: RedisClient) -> None:
        self.client = client
        self.cluster = isinstance(client, RedisCluster)
        self.known = not self.cluster  # whether the slots were read (a cluster client reads them lazily)

    async def learn(self) -> None:
        """Read the cluster's slots, if the shared client has not yet."""
        if isinstance(self.client, RedisCluster):
            await self.client.initialize()
        self.known = True

    def of(self, key: bytes | str) -> str:
        """The name (host:port) of the master serving `key`'s slot, as this process last learned.
        Raises SlotNotCoveredError while no node serves it."""
        if not isinstance(self.client, RedisCluster):
            return ONE_NODE
        node = self.client.get_node_from_key(key)  # type: ignore[arg-type]  # bytes are keys too
        if node is None:
            raise SlotNotCoveredError(f"no node serves the slot of {key!r}")
        return str(node.name)

    def masters(self) -> list[str]:
        if not isinstance(self.client, RedisCluster):
            return [ONE_NODE]
        return sorted(n.name for n in self.client.get_primaries())

    async def refresh(self) -> None:
        """Learn the cluster's slots again (a cluster only; concurrent calls share one refresh)."""
        if isinstance(self.client, RedisCluster):
            await self.client.nodes_manager.initialize()

    def connection(self, name: str) -> AbstractConnection:
        """A new, unconnected connection to a node, set up as the shared client's are (TLS, AUTH,
        SELECT), that never retries on its own: its user decides."""
        if not isinstance(self.client, RedisCluster):
            conn: AbstractConnection = self.client.connection_pool.make_connection()  # type: ignore[no-untyped-call]
        else:
            node = self.client.get_node(node_name=name)
            if node is None:
                raise SlotNotCoveredError(f"node {name} is not in the cluster any more")
            kwargs: dict[str, Any] = dict(node.connection_kwargs)
            conn = node.connection_class(**kwargs)
        conn.retry = Retry(NoBackoff(), 0)
        return conn

    def listener(self, name: str) -> Redis:
        """A client for pub/sub on one node: no retries (its user reconnects), no socket timeout
        (it waits for messages), keepalive health checks to notice a dead link."""
        if not isinstance(self.client, RedisCluster):
            kwargs = dict(self.client.connection_pool.connection_kwargs)
            cls = self.client.connection_pool.connection_class
        else:
            node = self.client.get_node(node_name=name)
            if node is None:
                raise SlotNotCoveredError(f"node {name} is not in the cluster any more")
            kwargs, cls = dict(node.connection_kwargs), node.connection_class
        kwargs.update(socket_timeout=None, socket_connect_timeout=CONNECT_TIMEOUT_S, retry=Retry(NoBackoff(), 0),
                      health_check_interval=15)
        kwargs.pop("event_dispatcher", None)
        return Redis(connection_pool=ConnectionPool(connection_class=cls, max_connections=2, **kwargs))
