"""The jobs' sign of life: every jobs process of a deployment renews one key in Redis, and
/healthz reads it, so it tells the truth wherever the jobs run (`serve`'s child or
`livesale jobs` elsewhere). Without a beat for STALE_S, nothing expires unpaid orders, starts
or ends sales, or moves orders to SQL: the servers answer 503 naming `jobs`."""

from __future__ import annotations

import logging
import time

from server.backends.loops import repeat
from server.backends.redis_client import RedisClient

log = logging.getLogger("livesale.jobs")

BEAT_S = 2.0
STALE_S = 15.0


def key(deployment: str) -> str:
    """String: when a jobs process last beat (ms since the epoch); expires STALE_S after."""
    return f"jobs:alive:{deployment}"


async def beat(redis: RedisClient, deployment: str) -> None:
    """Renew the key every BEAT_S, until cancelled. It runs beside the jobs' loops, and the
    process exits (to be restarted) as soon as any of them ends, so a beat means all run."""
    async def once() -> None:
        await redis.set(key(deployment), int(time.time() * 1000), px=int(STALE_S * 1000))
    await repeat(once, every_s=BEAT_S, what="jobs heartbeat", logger=log)


async def alive(redis: RedisClient, deployment: str) -> bool:
    return bool(await redis.exists(key(deployment)))
