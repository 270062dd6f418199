"""The shared Redis client: one server (`redis://`, `rediss://`, `unix://`) or a Redis Cluster
(`redis+cluster://host1:port1,host2:port2/`, `rediss+cluster://` with TLS: seed nodes, from which
the client learns the topology and follows MOVED and ASK redirections).

One server gets a *blocking* pool
A *blocking* pool: under a purchase spike, redis-py's default pool raises as
soon as its connections run out; this one makes callers wait (up to a
deadline) for a free connection instead. A cluster's client keeps a pool per
node that raises when full (MaxConnectionsError, answered 503); its hot
path, the scripts, goes through the auto-pipeline's own connection per node. Retries after a dropped connection
or a timeout are kept short and few, so a dead Redis fails a request fast
(503) rather than hanging it; every script we run is safe to run twice (those
that count, like the chat and likes scripts, remember their answer for 20 s:
longer than the retries take). A retried publish of a room event (a pin, a
lineup) may reach viewers twice: those events carry state, so that only
repeats it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeAlias
from urllib.parse import unquote, urlsplit

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import ClusterDownError, RedisClusterException, RedisError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from server.errors import ConfigError

RedisClient: TypeAlias = Redis | RedisCluster
# What Redis may raise: a cluster client's own refusals (no node serves a slot, the topology
# cannot be read) are not RedisErrors.
REDIS_ERRORS = (RedisError, RedisClusterException)

POOL_WAIT_S = 5.0
SOCKET_TIMEOUT_S = 5.0
CONNECT_TIMEOUT_S = 2.0


def text(value: bytes | str) -> str:
    """A reply as text: our clients answer bytes, though redis-py's types allow either."""
    return value.decode() if isinstance(value, bytes) else value


RETRIES = 2  # after a dropped connection or a timeout, this many more tries, spaced by backoff()


def backoff() -> ExponentialWithJitterBackoff:
    return ExponentialWithJitterBackoff(base=0.05, cap=0.5)


def make_retry() -> Retry:
    return Retry(backoff(), retries=RETRIES, supported_errors=(RedisConnectionError, RedisTimeoutError))


CLUSTER_SCHEMES = {"redis+cluster": False, "rediss+cluster": True}  # scheme -> TLS


@dataclass(frozen=True)
class ClusterUrl:
    """A `redis+cluster://[user:password@]host:port,host:port/` URL, parsed."""
    seeds: tuple[tuple[str, int], ...]
    tls: bool
    username: str | None
    password: str | None


def parse_cluster_url(url: str) -> ClusterUrl | None:
    """The cluster a REDIS_URL names; None for a one-server URL. Refuses what a cluster cannot
    be given: a database index other than 0, a seed without a port."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in CLUSTER_SCHEMES:
        if "," in rest.partition("/")[0]:
            raise ConfigError(f"REDIS_URL lists several hosts: for a Redis Cluster write redis+cluster://{rest}")
        return None
    netloc, _, path = rest.partition("/")
    userinfo, _, hosts = netloc.rpartition("@")
    username, _, password = userinfo.partition(":")
    if path.partition("?")[0] not in ("", "0"):
        raise ConfigError("a Redis Cluster has only database 0: end REDIS_URL with / or /0")
    seeds = []
    for seed in hosts.split(","):
        parts = urlsplit("//" + seed.strip())
        try:
            port = parts.port
        except ValueError:
            port = None
        if not parts.hostname or port is None:
            raise ConfigError(f"REDIS_URL: cluster seed {seed!r} is not host:port")
        seeds.append((parts.hostname, port))
    return ClusterUrl(tuple(seeds), CLUSTER_SCHEMES[scheme.lower()], unquote(username) or None,
                      unquote(password) or None)


def make_redis(url: str, max_connections: int) -> RedisClient:
    cluster = parse_cluster_url(url)
    if cluster is not None:
        # Redirections and a failed-over master are followed by the client, a few times, then
        # the request fails (503) rather than waiting for the cluster to settle.
        return RedisCluster(
            startup_nodes=[ClusterNode(host, port) for host, port in cluster.seeds],
            require_full_coverage=True, max_connections=max_connections, ssl=cluster.tls,
            username=cluster.username, password=cluster.password,
            socket_timeout=SOCKET_TIMEOUT_S, socket_connect_timeout=CONNECT_TIMEOUT_S,
            retry=make_retry(), health_check_interval=30)
    pool = BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=POOL_WAIT_S,
        socket_timeout=SOCKET_TIMEOUT_S,
        socket_connect_timeout=CONNECT_TIMEOUT_S,
        retry=make_retry(),
        health_check_interval=30,
    )
    return Redis(connection_pool=pool)


async def close(client: RedisClient) -> None:
    """Close a client and every connection of its pool (or of its cluster's nodes)."""
    if isinstance(client, RedisCluster):
        await client.aclose()
    else:
        await client.aclose(close_connection_pool=True)


async def check_topology(client: RedisClient) -> None:
    """Refuse a one-server URL that points at a node of a cluster: that client would be answered
    MOVED for most keys. (Said once at start-up; a Redis that does not answer yet is not checked.)"""
    if isinstance(client, RedisCluster):
        return
    try:
        enabled = (await client.info("cluster")).get("cluster_enabled")
    except (RedisConnectionError, RedisTimeoutError):
        return
    if str(enabled) == "1":
        raise ConfigError("REDIS_URL points at a node of a Redis Cluster: write it as "
                          "redis+cluster://host:port,host:port/ (seed nodes) to use the cluster")


async def ping(client: RedisClient) -> None:
    """Raise unless Redis serves: a server answers PING; a cluster says cluster_state:ok with every
    slot assigned and none failing (a master down and not yet replaced fails its slots)."""
    if not isinstance(client, RedisCluster):
        await client.ping()
        return
    info = await client.cluster_info()
    assigned, failing = int(info.get("cluster_slots_assigned", 0)), int(info.get("cluster_slots_fail", 0))
    if info.get("cluster_state") != "ok" or assigned != 16384 or failing:
        raise ClusterDownError(f"cluster_state:{info.get('cluster_state')}, {assigned} slots assigned, {failing} failing")
