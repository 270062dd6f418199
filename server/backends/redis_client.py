"""The shared Redis client.

A *blocking* pool: under a purchase spike, redis-py's default pool raises as
soon as its connections run out; this one makes callers wait (up to a
deadline) for a free connection instead. Retries after a dropped connection
or a timeout are kept short and few, so a dead Redis fails a request fast
(503) rather than hanging it; every script we run is safe to run twice (those
that count, like the chat and likes scripts, remember their answer for 20 s:
longer than the retries take). A retried publish of a room event (a pin, a
lineup) may reach viewers twice: those events carry state, so that only
repeats it.
"""

from __future__ import annotations

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff, NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

POOL_WAIT_S = 5.0
SOCKET_TIMEOUT_S = 5.0
CONNECT_TIMEOUT_S = 2.0


def text(value: bytes | str) -> str:
    """A reply as text: our clients answer bytes, though redis-py's types allow either."""
    return value.decode() if isinstance(value, bytes) else value


def make_retry() -> Retry:
    return Retry(ExponentialWithJitterBackoff(base=0.05, cap=0.5), retries=2,
                 supported_errors=(RedisConnectionError, RedisTimeoutError))


def make_listener(url: str) -> Redis:
    """For pub/sub: no retries (the broker handles reconnects itself), no socket timeout
    (it waits for messages), keepalive health checks to notice a dead link."""
    return Redis.from_url(url, socket_connect_timeout=CONNECT_TIMEOUT_S, socket_timeout=None,
                          retry=Retry(NoBackoff(), 0), health_check_interval=15)


def make_redis(url: str, max_connections: int) -> Redis:
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
