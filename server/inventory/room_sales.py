"""Which sale a room shows, and one launch at a time per room, across processes."""

from __future__ import annotations

import contextlib
import secrets
from typing import AsyncIterator

from server.backends.lua import load_script
from server.backends.redis_client import RedisClient, text
from server.errors import Conflict
from server.inventory import keys


class RoomSales:
    def __init__(self, redis: RedisClient) -> None:
        self._redis = redis
        self._unlock = load_script(redis, "server.inventory", "launch_unlock.lua")

    @contextlib.asynccontextmanager
    async def launch_lock(self, room_id: str, lease_s: float) -> AsyncIterator[None]:
        """One sale launch at a time per room (the check for a running sale and the new sale's
        creation must not interleave). The holder must be done within `lease_s`: after it the
        lock lapses, so that a crashed launch does not block the room."""
        key, token = keys.launching(room_id), secrets.token_hex(8)
        if not await self._redis.set(key, token, nx=True, px=int(lease_s * 1000)):
            raise Conflict("another sale is being launched in this room", code="sale_running")
        try:
            yield
        finally:
            await self._unlock(keys=[key], args=[token])

    async def current(self, room_id: str) -> str | None:
        sale_id = await self._redis.get(keys.room_sale(room_id))
        return text(sale_id) if sale_id else None

    async def set_current(self, room_id: str, sale_id: str) -> None:
        await self._redis.set(keys.room_sale(room_id), sale_id)
