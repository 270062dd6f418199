"""Publishing on the rooms' channels, from any process (web or jobs).

Every event of a room goes through its one Redis channel, also to the publisher's own viewers,
so that every process sees one order. Sharded pub/sub (SPUBLISH, Redis/Valkey 7+) keeps a
channel on its slot's node; on older servers, plain PUBLISH. Scripts that publish are given the
command as an argument (they cannot find out which the server has).
"""

from __future__ import annotations

import logging

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from server.rooms import keys

log = logging.getLogger("livesale.rooms.publisher")


class Publisher:
    def __init__(self, redis: Redis, *, sharded: bool) -> None:
        self._redis = redis  # the shared client, with its retries
        self.sharded = sharded

    @classmethod
    async def detect(cls, redis: Redis) -> Publisher:
        """Use sharded pub/sub when the server has it."""
        try:
            await redis.execute_command("SPUBLISH", "livesale:probe", b"")  # type: ignore[no-untyped-call]
            sharded = True
        except ResponseError:
            sharded = False
        log.info("room fan-out uses %s", "sharded pub/sub" if sharded else "pub/sub")
        return cls(redis, sharded=sharded)

    @property
    def command(self) -> str:
        return "SPUBLISH" if self.sharded else "PUBLISH"

    async def publish(self, room_id: str, message: bytes) -> None:
        """A message made by protocol.to_everyone, to_host or to_hubs."""
        await self._redis.execute_command(self.command, keys.channel(room_id), message)  # type: ignore[no-untyped-call]

    async def end_session(self, session_id: str) -> None:
        """Every process closes the sockets of this logged-out session."""
        await self._redis.execute_command(self.command, keys.SESSIONS_CHANNEL, session_id)  # type: ignore[no-untyped-call]
