"""Background clock of the open sales: releases orders not paid in time, and
announces a sale's start and its end by time.

Every process runs one; the scripts make that safe: an order is released at
most once, a sale ends once, and its start is announced by one process.
"""

from __future__ import annotations

import logging
import time

import msgspec

from server.backends.loops import repeat
from server.inventory.notifier import SaleNotifier
from server.inventory.stock import Stock
from server.inventory.views import sale_out
from server.rooms import protocol
from server.rooms.service import RoomService

log = logging.getLogger("livesale.inventory.sweeper")

EVERY_S = 0.25


class Sweeper:
    def __init__(self, stock: Stock, rooms: RoomService, notifier: SaleNotifier) -> None:
        self.stock = stock
        self._rooms = rooms
        self._notifier = notifier

    async def sweep_sale(self, sale_id: str) -> int:
        """One pass over one sale; returns how many orders it released."""
        state = await self.stock.state(sale_id)
        if state is None:
            return 0
        now_ms = int(time.time() * 1000)
        room_id = state.room_id
        if state.ended_at == 0 and now_ms >= state.ends_at and await self.stock.end(sale_id, "time"):
            state = await self.stock.state(sale_id) or state
            await self._rooms.tell(room_id, protocol.SaleEnded(id=sale_id, reason="time", v=state.v))
        elif state.starts_at <= now_ms < state.ends_at and state.ended_at == 0 and not state.started_announced \
                and (v := await self.stock.mark_started(sale_id)):
            # The figures as of the new version (or later).
            state = await self.stock.state(sale_id) or msgspec.structs.replace(state, v=v)
            await self._rooms.tell(room_id, protocol.Sale(sale=sale_out(sale_id, state, now_ms)))
        released = 0
        for order_id in await self.stock.due(sale_id, now_ms):
            outcome = await self.stock.release(sale_id, order_id, "expired")
            if outcome.status == "released":
                released += 1
        if released:
            self._notifier.touch(sale_id)
        return released

    async def sweep(self) -> int:
        released = 0
        for sale_id in await self.stock.open_sales():
            released += await self.sweep_sale(sale_id)
        return released

    async def _step(self) -> None:
        await self.sweep()

    async def run(self) -> None:
        await repeat(self._step, every_s=EVERY_S, what="sweep", logger=log)
