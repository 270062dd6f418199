"""The jobs' sign of life, and how they share the work.

Every jobs process of a deployment renews one key in Redis, and /healthz reads it, so it tells
the truth wherever the jobs run (`serve`'s child or `livesale jobs` elsewhere). Without a beat
for STALE_S, nothing expires unpaid orders, starts or ends sales, or moves orders to SQL: the
servers answer 503 naming `jobs`.

Each beat also names the process in the deployment's members (a sorted set: member -> last
beat), and reads who else beat within MEMBER_STALE_S. Each open sale belongs to one live member,
by rendezvous hashing of (member, sale): a new member takes an even share and moves only that
share, and the share of a member that stops beating goes to the others at their next beat, so
within MEMBER_STALE_S + BEAT_S (8 s). While the members change, two processes may both visit a
sale for a beat or two: every job is safe to run twice at once (stream consumer groups, scripts
that change an order once), so that costs only the double visit."""

from __future__ import annotations

import hashlib
import logging
import time
from typing import cast

from server.backends.loops import repeat
from server.backends.redis_client import RedisClient, text

log = logging.getLogger("livesale.jobs")

BEAT_S = 2.0
STALE_S = 15.0
MEMBER_STALE_S = 6.0  # three beats missed: the member's sales go to the others


def key(deployment: str) -> str:
    """String: when a jobs process last beat (ms since the epoch); expires STALE_S after."""
    return f"jobs:alive:{deployment}"


def members_key(deployment: str) -> str:
    """Sorted set: jobs process -> when it last beat (ms since the epoch)."""
    return f"jobs:members:{deployment}"


def _rank(member: str, sale_id: str) -> bytes:
    return hashlib.blake2b(f"{member}\n{sale_id}".encode(), digest_size=8).digest()


class Members:
    """The live jobs processes of a deployment, as this one (`me`) last read them."""

    def __init__(self, redis: RedisClient, deployment: str, me: str) -> None:
        self._redis = redis
        self._deployment = deployment
        self.me = me
        self.live: tuple[str, ...] = (me,)
        self.version = 0  # bumped when `live` changes: the watch then reads the open sales again

    def mine(self, sale_id: str) -> bool:
        """Whether this process looks after the sale (always, while it knows of no other)."""
        if len(self.live) == 1:
            return True
        return max(self.live, key=lambda m: _rank(m, sale_id)) == self.me

    async def beat(self) -> None:
        """One beat: the deployment's sign of life, this member's, and who else is live."""
        now = int(time.time() * 1000)
        await self._redis.set(key(self._deployment), now, px=int(STALE_S * 1000))
        members = members_key(self._deployment)
        await self._redis.zadd(members, {self.me: now})
        await self._redis.zremrangebyscore(members, "-inf", now - int(MEMBER_STALE_S * 1000))
        names = cast(list[bytes], await self._redis.zrange(members, 0, -1))
        live = tuple(sorted({text(m) for m in names} | {self.me}))
        if live != self.live:
            log.info("jobs processes of this deployment: %d (%s)", len(live), ", ".join(live))
            self.live = live
            self.version += 1

    async def leave(self) -> None:
        """Stopping: hand this member's share to the others now, not after MEMBER_STALE_S."""
        await self._redis.zrem(members_key(self._deployment), self.me)

    async def run(self) -> None:
        """Beat every BEAT_S, until cancelled. It runs beside the jobs' loops, and the process
        exits (to be restarted) as soon as any of them ends, so a beat means all run."""
        await repeat(self.beat, every_s=BEAT_S, what="jobs heartbeat", logger=log)


async def alive(redis: RedisClient, deployment: str) -> bool:
    return bool(await redis.exists(key(deployment)))
