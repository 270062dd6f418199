"""Throttled `sale_update` events: at most one per sale per tick and process,
carrying the numbers read from Redis at send time (never a stale copy)."""

from __future__ import annotations

import asyncio
import logging

from redis.asyncio import Redis

from server.inventory import keys
from server.loops import running
from server.rooms import protocol
from server.rooms.service import RoomService

log = logging.getLogger("livesale.inventory.notifier")

TICK_S = 0.05


class SaleNotifier:
    def __init__(self, redis: Redis, rooms: RoomService) -> None:
        self.redis = redis
        self.rooms = rooms
        self._dirty: dict[str, str] = {}  # sale -> room

    def touch(self, sale_id: str, room_id: str) -> None:
        self._dirty[sale_id] = room_id

    async def flush(self) -> None:
        dirty, self._dirty = self._dirty, {}
        for sale_id, room_id in dirty.items():
            remaining, reserved, paid, v = await self.redis.hmget(keys.sale(sale_id),
                                                                  ["remaining", "reserved", "paid", "v"])
            if remaining is None or reserved is None or paid is None or v is None:
                continue
            await self.rooms.tell(room_id, protocol.SaleUpdate(
                id=sale_id, remaining=int(remaining), sold=int(reserved) + int(paid), v=int(v)))

    async def run(self) -> None:
        while running():
            await asyncio.sleep(TICK_S)
            if self._dirty:
                try:
                    await self.flush()
                except Exception as exc:  # Redis away: the next change sends fresh numbers
                    log.warning("sale update failed: %r", exc)
