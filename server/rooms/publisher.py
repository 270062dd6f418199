"""Publishing on the rooms' channels, from any process (web or jobs).

Every event of a room goes through its one Redis channel, also to the publisher's own viewers,
so that every process sees one order. Sharded pub/sub (SPUBLISH, Redis/Valkey 7+) keeps a
channel on its slot's node; on older servers, plain PUBLISH. Scripts that publish are given the
command as an argument (they cannot find out which the server has).
"""

from __future__ import annotations

import logging

from redis.asyncio.cluster import RedisCluster
from redis.exceptions import AskError, ResponseError

from server.backends.redis_client import RedisClient
from server.errors import ConfigError
from server.rooms import keys

log = logging.getLogger("livesale.rooms.publisher")


class Publisher:
    def __init__(self, redis: RedisClient, *, sharded: bool) -> None:
        self._redis = redis  # the shared client, with its retries
        self.sharded = sharded

    @classmethod
    async def detect(cls, redis: RedisClient) -> Publisher:
        """Use sharded pub/sub when the server has it (a cluster must: PUBLISH there goes to every
        node). Only "unknown command" means it has not; a redirection or any other refusal is an
        error of its own, raised."""
        try:
            await redis.execute_command("SPUBLISH", "livesale:probe", b"")
            sharded = True
        except ResponseError as exc:
            if isinstance(exc, AskError) or "unknown command" not in str(exc).lower():
                raise
            if isinstance(redis, RedisCluster):
                raise ConfigError("this Redis Cluster has no sharded pub/sub (SPUBLISH): livesale needs "
                                  "Redis 7 or Valkey 7 or newer on a cluster") from None
            sharded = False
        log.info("room fan-out uses %s", "sharded pub/sub" if sharded else "pub/sub")
        return cls(redis, sharded=sharded)

    @property
    def command(self) -> str:
        return "SPUBLISH" if self.sharded else "PUBLISH"

    async def publish(self, room_id: str, message: bytes) -> None:
        """A message made by protocol.to_everyone, to_host or to_hubs."""
        await self._redis.execute_command(self.command, keys.channel(room_id), message)

    async def end_session(self, session_id: str) -> None:
        """Every process closes the sockets of this logged-out session."""
        await self._redis.execute_command(self.command, keys.SESSIONS_CHANNEL, session_id)
