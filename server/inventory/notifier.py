"""Throttled `sale_update` events: at most one per sale per tick and process,
carrying the numbers read from Redis at send time (never a stale copy); and, for the same
sales, one wake per tick for the jobs processes (server/inventory/watch.py)."""

from __future__ import annotations

import logging

from server.backends.loops import repeat
from server.inventory.stock import Stock
from server.rooms import protocol
from server.rooms.service import RoomService

log = logging.getLogger("livesale.inventory.notifier")


class SaleNotifier:
    def __init__(self, stock: Stock, rooms: RoomService) -> None:
        self._stock = stock
        self._rooms = rooms
        self._dirty: set[str] = set()  # sales whose figures changed since the last tick

    def touch(self, sale_id: str) -> None:
        self._dirty.add(sale_id)

    async def flush(self) -> None:
        dirty, self._dirty = self._dirty, set()
        try:
            await self._stock.wake(dirty)
        except Exception:
            self._dirty |= dirty  # a wake is worth a retry: without it the jobs wait up to watch.IDLE_S
            raise
        for sale_id in dirty:
            figures = await self._stock.figures(sale_id)
            room_id = await self._stock.room_of(sale_id)
            if figures is None or room_id is None:
                continue
            remaining, sold, v = figures
            await self._rooms.tell(room_id, protocol.SaleUpdate(id=sale_id, remaining=remaining, sold=sold, v=v))

    async def _step(self) -> None:
        if self._dirty:
            await self.flush()

    async def run(self) -> None:
        # A failed flush drops its sales' updates: the next change sends fresh numbers.
        await repeat(self._step, every_s=protocol.TICK_S, what="sale update", logger=log)
