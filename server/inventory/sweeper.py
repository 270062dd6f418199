"""Background clock of the open sales: releases orders not paid in time, and
announces a sale's start and its end by time.

Every process runs one; the scripts make that safe: an order is released at
most once, a sale ends once, and its start is announced by one process.
"""

from __future__ import annotations

import asyncio
import logging
import time

from server.inventory.notifier import SaleNotifier
from server.inventory.sales import SaleService, sale_out
from server.inventory.stock import Stock
from server.loops import running
from server.rooms import protocol

log = logging.getLogger("livesale.inventory.sweeper")

EVERY_S = 0.25


class Sweeper:
    def __init__(self, stock: Stock, sales: SaleService, notifier: SaleNotifier) -> None:
        self.stock = stock
        self.sales = sales
        self.notifier = notifier

    async def sweep_sale(self, sale_id: str) -> int:
        """One pass over one sale; returns how many orders it released."""
        state = await self.stock.state(sale_id)
        if state is None:
            return 0
        now_ms = int(time.time() * 1000)
        room_id = state["room_id"]
        if state["ended_at"] == 0 and now_ms >= state["ends_at"] and await self.stock.end(sale_id, "time"):
            state = await self.stock.state(sale_id) or state
            await self.sales.rooms.tell(room_id, protocol.SaleEnded(id=sale_id, reason="time", v=state["v"]))
        elif state["starts_at"] <= now_ms < state["ends_at"] and state["ended_at"] == 0 \
                and "started_announced" not in state and (v := await self.stock.mark_started(sale_id)):
            state = await self.stock.state(sale_id) or {**state, "v": v}  # the figures as of the new version
            await self.sales.rooms.tell(room_id, protocol.Sale(sale=sale_out(sale_id, state, now_ms)))
        released = 0
        for order_id in await self.stock.due(sale_id, now_ms):
            outcome = await self.stock.release(sale_id, order_id, "expired")
            if outcome.status == "released":
                released += 1
        if released:
            self.notifier.touch(sale_id, room_id)
        return released

    async def sweep(self) -> int:
        released = 0
        for sale_id in await self.stock.open_sales():
            released += await self.sweep_sale(sale_id)
        return released

    async def run(self) -> None:
        while running():
            try:
                await self.sweep()
            except Exception as exc:  # Redis away for a moment: try again next pass
                log.warning("sweep failed: %r", exc)
            await asyncio.sleep(EVERY_S)
