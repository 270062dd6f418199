"""Which open sales the jobs process visits, and when: a sale is visited when it changed (a
wake: its id in the deployment's wake stream, written by whoever changed it) or when its own
next deadline comes (its start, its end, an order's pay-by time, a capture owed), and at least
every IDLE_S. An open sale that nothing happens to costs a few commands a minute, not a poll
of every sale several times a second (2,000 idle week-long sales had the jobs process at 73%
of a core, and orders of an unrelated sale reached SQL 8x slower).

With several jobs processes, each watches only its share of the open sales (heartbeat.Members):
the wakes and the open-sales set are read by all, and each keeps the sales that are its own."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import cast

from server.backends.loops import repeat
from server.backends.redis_client import text
from server.heartbeat import Members
from server.inventory.stock import Stock

log = logging.getLogger("livesale.inventory.watch")

IDLE_S = 30.0      # the longest a sale goes unvisited (wakes lost, a deadline missed: bounded by this)
REFRESH_S = 5.0    # how often the open-sales set is read again (a launch also wakes)
BLOCK_MS = 1000    # a wait on the wake stream
LOOPS = ("persister", "sweeper", "captures")


class SaleWatch:
    """Shared by the jobs' loops of one process: the open sales it knows, and per loop those
    woken since it last looked and when each is next due."""

    def __init__(self, stock: Stock, members: Members | None = None) -> None:
        self.stock = stock
        self.members = members  # None: every open sale is this process's
        self._members_version = 0
        self.known: set[str] = set()  # the open sales this process looks after
        self._woken: dict[str, set[str]] = {name: set() for name in LOOPS}
        self._due: dict[str, dict[str, float]] = {name: {} for name in LOOPS}
        self._refreshed = float("-inf")
        self._last_id: str | None = None  # the wake stream's last entry read
        self._resync = False

    def mine(self, sale_id: str) -> bool:
        return self.members is None or self.members.mine(sale_id)

    def wake(self, sale_ids: Iterable[str]) -> None:
        ids = {s for s in sale_ids if self.mine(s)}
        self.known |= ids
        for woken in self._woken.values():
            woken |= ids

    async def refresh(self) -> None:
        """Read the open sales again if REFRESH_S passed or the jobs processes changed: new ones
        (and those this process just took over) are visited at once, archived ones (and those
        handed to another) forgotten."""
        members_version = self.members.version if self.members is not None else 0
        if time.monotonic() - self._refreshed < REFRESH_S and members_version == self._members_version:
            return
        self._members_version = members_version
        open_now = {s for s in await self.stock.open_sales() if self.mine(s)}
        self._refreshed = time.monotonic()
        new = open_now - self.known
        self.known = open_now
        self.wake(new)
        for due in self._due.values():
            for gone in set(due) - open_now:
                del due[gone]

    async def visit(self, loop: str) -> list[str]:
        """The sales `loop` should visit now: woken, due, or not visited for IDLE_S."""
        await self.refresh()
        now = time.monotonic()
        woken, self._woken[loop] = self._woken[loop], set()
        due = self._due[loop]
        return sorted(s for s in self.known if s in woken or due.get(s, 0.0) <= now)

    def next_visit(self, loop: str, sale_id: str, at_ms: int | None = None) -> None:
        """When `loop` should visit the sale again: at `at_ms` (Redis's epoch ms), IDLE_S from now
        at the latest; 0: at once."""
        now = time.monotonic()
        delay = IDLE_S if at_ms is None else min(IDLE_S, max(0.0, at_ms / 1000 - time.time()))
        self._due[loop][sale_id] = now + delay

    async def listen(self) -> None:
        """Read the wake stream (a blocking read, one key) until cancelled."""
        async def once() -> float:
            try:
                await read()
            except Exception:
                # Redis away or failing: wakes written meanwhile may be lost (a process could not
                # write them): once reading works again, visit every sale.
                self._resync = True
                raise
            if self._resync:
                self._resync = False
                self.wake(self.known)
            return 0.0

        async def read() -> None:
            if self._last_id is None:  # from what is there now: the first refresh visits every sale anyway
                last = await self.stock.redis.xrevrange(self.stock.wakes_key, count=1)
                self._last_id = text(last[0][0]) if last and last[0][0] else "0-0"
            reply = await self.stock.redis.xread({self.stock.wakes_key: self._last_id}, block=BLOCK_MS, count=1000)
            streams = cast(list[tuple[bytes, list[tuple[bytes, dict[bytes, bytes]]]]], reply or [])
            for _, entries in streams:
                for entry_id, fields in entries:
                    self._last_id = text(entry_id)
                    self.wake(s for s in text(fields.get(b"sales", b"")).split(",") if s)
        await repeat(once, every_s=1.0, what="reading sale wakes", logger=log)
