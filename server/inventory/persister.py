"""Moves every order change from the sales' Redis streams into SQL.

Each reserve/pay/release script appends the order's new record to its sale's
stream in the same atomic step that makes the change, so whatever a buyer was
told is in the stream. The persister reads the streams with a consumer group,
writes a batch in one SQL transaction (an upsert keyed on the order id that
only moves an order to a higher `version`, and ledger lines unique per order
and kind), and only then acknowledges. If it dies between the write and the
acknowledgement, the entries stay pending; after CLAIM_IDLE_MS any persister
claims and rewrites them, which changes nothing the second time.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
import time
from typing import Any, cast

import msgspec
from redis.exceptions import ResponseError
from sqlalchemy import Table, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from server import clock
from server.backends.loops import repeat
from server.backends.redis_client import RedisClient
from server.inventory import keys, ledger
from server.inventory.records import EndReason, OrderRecord
from server.inventory.stock import Stock, decode_order
from server.inventory.tables import LedgerEntry, Order, Sale
from server.inventory.watch import IDLE_S, SaleWatch
from server.metrics import PERSISTED
from server.models import User

log = logging.getLogger("livesale.inventory.persister")

BATCH = 500
CLAIM_IDLE_MS = 30_000
CLAIM_EVERY_S = 5.0
# Between passes once caught up. A pass has a fixed cost (a read per sale, a transaction,
# an acknowledgement) of about a millisecond of CPU; passing as fast as orders came in
# cost more per order than the purchase itself during a spike. Waiting lets a pass take
# everything that arrived meanwhile; orders reach SQL within about this long.
PASS_INTERVAL_S = 0.1

Entry = tuple[bytes, dict[bytes, bytes]]


class SaleEnded(msgspec.Struct):
    """A stream entry of end_sale.lua."""
    ended_at: int
    reason: EndReason


_sale_ended = msgspec.json.Decoder(SaleEnded)


@functools.cache
def _statements(dialect: str) -> tuple[Any, Any]:
    """The two upserts, built once per dialect and run with a list of rows (executemany),
    so SQLAlchemy compiles each once instead of once per batch. On the tables, not the ORM
    classes: the ORM's bulk-insert path costs more per row than the insert itself."""
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    orders = insert(cast(Table, Order.__table__))
    changing = ("status", "payment_ref", "paid_at", "released_at", "version")
    orders = orders.on_conflict_do_update(index_elements=[Order.id],
                                          set_={c: orders.excluded[c] for c in changing},
                                          where=Order.version < orders.excluded.version)
    lines = insert(cast(Table, LedgerEntry.__table__)).on_conflict_do_nothing(
        index_elements=[LedgerEntry.order_id, LedgerEntry.kind])
    return orders, lines


def _ms(value: int | None) -> Any:
    return clock.from_ms(value) if value else None


class Persister:
    def __init__(self, redis: RedisClient, stock: Stock, db: async_sessionmaker[AsyncSession], *,
                 consumer: str | None = None, claim_idle_ms: int = CLAIM_IDLE_MS,
                 watch: SaleWatch | None = None) -> None:
        self.redis = redis
        self.stock = stock
        self.db = db
        self.consumer = consumer or f"{socket.gethostname()}-{os.getpid()}"
        self.claim_idle_ms = claim_idle_ms
        self._failed: set[str] = set()  # sales whose last write failed
        self._missing: set[str] = set()  # sales not in SQL, already logged
        self._claimed_at = 0.0  # the last look for entries a crashed persister left
        self._all_claimed_at = 0.0  # ... in every open sale
        self._active: set[str] = set()  # sales with entries since that look
        self.watch = watch or SaleWatch(stock)

    # --- reading -----------------------------------------------------------------
    async def read(self, sale_id: str, count: int = BATCH, *, mine: bool = False) -> list[Entry]:
        """New entries; or, with mine=True, those this consumer read but has not acknowledged."""
        try:
            resp = await self.redis.xreadgroup(self.stock.group, self.consumer,
                                               {keys.log(sale_id): "0" if mine else ">"}, count=count)
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            if await self.redis.sismember(self.stock.open_key, sale_id):  # not archived meanwhile
                await self.stock.ensure_group(sale_id)
            return []
        return list(resp[0][1]) if resp else []  # type: ignore[index, arg-type]  # RESP2 reply: [[stream, entries]]

    async def claim(self, sale_id: str, count: int = BATCH) -> list[Entry]:
        """Entries another consumer read but never acknowledged (it crashed)."""
        try:
            resp = await self.redis.xautoclaim(keys.log(sale_id), self.stock.group, self.consumer,
                                               min_idle_time=self.claim_idle_ms, start_id="0-0", count=count)
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            return []
        return [(eid, fields) for eid, fields in resp[1] if fields]

    async def ack(self, sale_id: str, entries: list[Entry]) -> None:
        if entries:
            await self.redis.xack(keys.log(sale_id), self.stock.group, *[eid for eid, _ in entries])

    # --- writing -----------------------------------------------------------------
    async def apply(self, sale_id: str, entries: list[Entry]) -> bool:
        """Write the entries' changes in one transaction; False (nothing written) if the sale is
        not in SQL."""
        latest: dict[str, OrderRecord] = {}
        ended: SaleEnded | None = None
        for _, fields in entries:
            if b"order" in fields:
                rec = decode_order(fields[b"order"])
                if rec.id not in latest or latest[rec.id].v < rec.v:
                    latest[rec.id] = rec
            elif b"sale_ended" in fields:
                ended = _sale_ended.decode(fields[b"sale_ended"])
        async with self.db.begin() as db:
            sale = await db.get(Sale, sale_id)
            if sale is None:
                # A launch commits the sale before Redis has it, so this is a database that lost
                # it (restored from an older backup, or another deployment's): keep the entries
                # pending, for an operator to restore the sale, rather than drop orders.
                if sale_id not in self._missing:
                    self._missing.add(sale_id)
                    log.error("sale %s is not in SQL; its %d+ stream entries stay pending until it is",
                              sale_id, len(entries))
                return False
            self._missing.discard(sale_id)
            if latest:
                # Rows in one order (by id) in every persister: two writing overlapping orders at
                # once (several jobs processes on one PostgreSQL) would otherwise lock them in
                # opposite orders and deadlock.
                records = [latest[order_id] for order_id in sorted(latest)]
                await self._upsert_orders(db, sale, records)
                await self._ledger(db, sale, [r for r in records if r.status == "paid"])
            PERSISTED.inc(len(entries))
            if ended is not None:
                await db.execute(update(Sale).where(Sale.id == sale_id, Sale.ended_at.is_(None))
                                 .values(ended_at=_ms(ended.ended_at), end_reason=ended.reason))
        return True

    async def _upsert_orders(self, db: AsyncSession, sale: Sale, records: list[OrderRecord]) -> None:
        rows = [{
            "id": r.id, "sale_id": sale.id, "buyer_id": r.user_id, "quantity": r.quantity,
            "unit_price_cents": r.price_cents, "status": r.status, "ref_user_id": r.ref,
            "idempotency_key": r.key, "payment_ref": r.payment, "created_at": _ms(r.created_at),
            "pay_by": _ms(r.pay_by), "paid_at": _ms(r.paid_at), "released_at": _ms(r.released_at),
            "version": r.v,
        } for r in records]
        await db.execute(_statements(db.get_bind().dialect.name)[0], rows)

    async def _ledger(self, db: AsyncSession, sale: Sale, paid: list[OrderRecord]) -> None:
        if not paid:
            return
        refs = {r.ref for r in paid if r.ref}
        known = set((await db.scalars(select(User.id).where(User.id.in_(refs)))).all()) if refs else set()
        rows: list[dict[str, Any]] = []
        for r in paid:
            referrer = r.ref if r.ref in known and r.ref not in (r.user_id, sale.host_id) else None
            s = ledger.split(r.price_cents, r.quantity, sale.commission_rate_bp, sale.platform_fee_bp,
                             sale.referral_share_bp, referrer is not None)
            base = {"order_id": r.id, "sale_id": sale.id, "room_id": sale.room_id, "created_at": _ms(r.paid_at)}
            rows.append({**base, "account_id": sale.host_id, "kind": "host_commission",
                         "amount_cents": s.host_commission})
            rows.append({**base, "account_id": ledger.PLATFORM_ACCOUNT, "kind": "platform_fee",
                         "amount_cents": s.platform_fee})
            if referrer is not None:
                rows.append({**base, "account_id": referrer, "kind": "referral_share",
                             "amount_cents": s.referral_share})
        await db.execute(_statements(db.get_bind().dialect.name)[1], rows)

    # --- the loop ----------------------------------------------------------------------
    async def drain(self, sale_id: str) -> int:
        # After a pass that failed (SQL away; or Redis gone mid-read, when the entries it delivered
        # to this consumer never reached it), read our own unacknowledged entries first, until none
        # is left: waiting for the claims of another consumer's would take CLAIM_IDLE_MS.
        retry = sale_id in self._failed
        self._failed.add(sale_id)  # until a pass ends with nothing of ours unacknowledged
        entries = await self.read(sale_id, mine=retry)
        if retry and not entries:
            retry = False
            entries = await self.read(sale_id)
        if entries:
            if not await self.apply(sale_id, entries):
                return 0
            await self.ack(sale_id, entries)
        if not retry:
            self._failed.discard(sale_id)
        return len(entries)

    async def recover(self, sale_id: str) -> int:
        entries = await self.claim(sale_id)
        if entries:
            log.warning("sale %s: rewriting %d entries a crashed persister left unacknowledged",
                        sale_id, len(entries))
            if not await self.apply(sale_id, entries):
                return 0
            await self.ack(sale_id, entries)
        return len(entries)

    async def settled(self, sale_id: str) -> bool:
        """Ended, nothing reserved, no payment left to capture, and every stream entry persisted:
        no change can follow. Read in one transaction: between separate reads the last reserved
        order could be paid, its capture left owed and its entry persisted by another jobs
        process, and a sale closed with a capture owed would never get it (late captures visit
        open sales only). A sale still on is told by one field first, without the transaction."""
        if await self.redis.hget(keys.sale(sale_id), "ended_at") in (b"0", "0"):
            return False
        books = await self.stock.books(sale_id)
        if books.captures_owed:
            return False  # also when the sale's hash is gone: the late captures still need the sale open
        state = books.state
        if state is None or state.archived_at:  # never created, or archived but still indexed
            return True
        if state.ended_at == 0 or state.reserved != 0:
            return False
        group = books.group
        return group is not None and group["pending"] == 0 and group.get("lag") == 0

    async def step(self) -> float:
        """One pass over the sales the watch says to visit; the pause before the next (0: a
        backlog, go on at once). Recovery and settling run every CLAIM_EVERY_S for the sales
        that had entries since, and for every open sale each watch.IDLE_S."""
        backlog = False  # a full batch was read: more is waiting
        for sale_id in await self.watch.visit("persister"):
            drained = await self.drain(sale_id)
            backlog |= drained >= BATCH
            if drained:
                self._active.add(sale_id)
            self.watch.next_visit("persister", sale_id, 0 if drained >= BATCH else None)
        now = time.monotonic()
        if now - self._claimed_at >= CLAIM_EVERY_S:
            self._claimed_at = now
            every = now - self._all_claimed_at >= IDLE_S
            if every:
                self._all_claimed_at = now
            targets, self._active = (self.watch.known if every else self._active & self.watch.known), set()
            for sale_id in sorted(targets):
                backlog |= await self.recover(sale_id) >= BATCH
                if await self.settled(sale_id):
                    await self.stock.archive(sale_id)
        return 0.0 if backlog else PASS_INTERVAL_S

    async def run(self) -> None:
        # Redis or SQL away: the entries stay in the streams, and the pass is tried again.
        await repeat(self.step, every_s=PASS_INTERVAL_S, retry_s=1.0, what="persister pass", logger=log)
