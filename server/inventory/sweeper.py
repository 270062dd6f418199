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
from server.inventory.watch import SaleWatch
from server.rooms import protocol
from server.rooms.service import RoomService

log = logging.getLogger("livesale.inventory.sweeper")

EVERY_S = 0.25  # the clock's resolution: a deadline is acted on within this
DUE_BATCH = 500  # orders released per visit at most


class Sweeper:
    def __init__(self, stock: Stock, rooms: RoomService, notifier: SaleNotifier, watch: SaleWatch | None = None) -> None:
        self.stock = stock
        self._rooms = rooms
        self._notifier = notifier
        self.watch = watch or SaleWatch(stock)

    async def sweep_sale(self, sale_id: str) -> int:
        """One pass over one sale; returns how many orders it released."""
        state = await self.stock.state(sale_id)
        if state is None:
            self.watch.next_visit("sweeper", sale_id)
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
        due = await self.stock.due(sale_id, now_ms, DUE_BATCH)
        for order_id in due:
            outcome = await self.stock.release(sale_id, order_id, "expired")
            if outcome.status == "released":
                released += 1
        if released:
            self._notifier.touch(sale_id)
        # The next visit: this sale's next start, end or pay-by time (a new order's pay-by time
        # comes with a wake), at once if a full batch was due.
        deadlines = [state.ends_at] if state.ended_at == 0 else []
        if state.ended_at == 0 and not state.started_announced and state.starts_at > now_ms:
            deadlines.append(state.starts_at)
        first = await self.stock.first_due(sale_id)
        if first is not None:
            deadlines.append(first)
        self.watch.next_visit("sweeper", sale_id, 0 if len(due) >= DUE_BATCH else min(deadlines, default=None))
        return released

    async def sweep(self) -> int:
        released = 0
        for sale_id in await self.watch.visit("sweeper"):
            released += await self.sweep_sale(sale_id)
        return released

    async def _step(self) -> None:
        await self.sweep()

    async def run(self) -> None:
        await repeat(self._step, every_s=EVERY_S, what="sweep", logger=log)
