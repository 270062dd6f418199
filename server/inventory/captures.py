"""Captures the payments that the request which paid did not get to (its answer lost, its
process gone, the provider failing at that moment).

pay.lua makes each paid order's capture due CAPTURE_AFTER_MS later in the sale's captures set; the
paying request clears it once it captured. This loop, in the jobs process, takes the ones left
when due. Several jobs processes may run it at once: the provider's capture is idempotent per
authorization, so two captures of one order take the money once. A capture that fails or hangs
is tried again RETRY_AFTER_MS later, with an error in the log each time; the other orders go on,
and the sale stays open (not settled) until it succeeds.
"""

from __future__ import annotations

import asyncio
import logging
import time

from server.backends.loops import repeat
from server.inventory.orders import Orders
from server.inventory.payments import TIMEOUT_S
from server.inventory.stock import Stock
from server.inventory.watch import SaleWatch

log = logging.getLogger("livesale.inventory.captures")

EVERY_S = 1.0
RETRY_AFTER_MS = 60_000


class LateCaptures:
    def __init__(self, stock: Stock, orders: Orders, watch: SaleWatch | None = None) -> None:
        self.stock = stock
        self._orders = orders
        self.watch = watch or SaleWatch(stock)

    async def pass_sale(self, sale_id: str, now_ms: int) -> int:
        """Capture what is due in one sale; returns how many were captured."""
        captured = 0
        for order_id in await self.stock.captures_due(sale_id, now_ms):
            try:
                async with asyncio.timeout(TIMEOUT_S):
                    done = await self._orders.capture_late(sale_id, order_id)
            except Exception as exc:  # the provider failed or hung: this one later, the others now
                log.error("sale %s: capturing the payment of order %s failed (%r); trying again in %d s",
                          sale_id, order_id, exc, RETRY_AFTER_MS // 1000)
                await self.stock.capture_later(sale_id, order_id, now_ms + RETRY_AFTER_MS)
                continue
            if done:
                captured += 1
                log.warning("sale %s: captured the payment of order %s, which its request had not",
                            sale_id, order_id)
        return captured

    async def _step(self) -> None:
        now_ms = int(time.time() * 1000)
        for sale_id in await self.watch.visit("captures"):
            await self.pass_sale(sale_id, now_ms)
            self.watch.next_visit("captures", sale_id, await self.stock.first_capture(sale_id))

    async def run(self) -> None:
        await repeat(self._step, every_s=EVERY_S, what="capture pass", logger=log)
