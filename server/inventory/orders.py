"""Buying: a purchase reserves units, its buyer pays (authorize, pay.lua, capture) or cancels,
and reads their orders.

The purchase path touches only Redis (one script call, rate limits included): orders reach SQL
through the persister, never on the buyer's clock.
"""

from __future__ import annotations

import asyncio
import logging
import time

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from server.auth import Principal
from server.backends.redis_client import REDIS_ERRORS
from server.errors import Conflict, NotFound, PaymentRequired, TooManyRequests, Unavailable, Unprocessable
from server.ids import looks_like_id
from server.inventory.notifier import SaleNotifier
from server.inventory.payments import TIMEOUT_S as PROVIDER_TIMEOUT_S
from server.inventory.payments import Authorization, PaymentDeclined, PaymentProvider
from server.inventory.records import REFUSAL_MESSAGES, OrderRecord
from server.inventory.schemas import OrderOut, PurchaseIn
from server.inventory.stock import Stock, new_order_id, sale_of
from server.inventory.tables import Order
from server.inventory.views import not_cancellable, not_payable, order_out, order_row_out
from server.metrics import PURCHASE_SECONDS, PURCHASES
from server.ratelimit import PURCHASE_PER_IP, PURCHASE_PER_USER
from server.rooms import protocol
from server.rooms.service import RoomService

log = logging.getLogger("livesale.inventory.orders")

ORDERS_LISTED = 100


def _no_order() -> NotFound:
    return NotFound("no such order", code="order_not_found")


class Orders:
    def __init__(self, stock: Stock, db: async_sessionmaker[AsyncSession], payments: PaymentProvider,
                 notifier: SaleNotifier, rooms: RoomService) -> None:
        self._stock = stock
        self._db = db
        self._payments = payments
        self._notifier = notifier
        self._rooms = rooms

    # --- reserving -------------------------------------------------------------------------
    async def purchase(self, me: Principal, sale_id: str, idem_key: str, body: PurchaseIn,
                       ip: str | None) -> tuple[int, OrderOut]:
        """Reserve, within the buyer's purchase rate limits: per user, and per address unless `ip`
        is None (an exempt address). 201 and the new order, or 200 and the one this key made."""
        ref = body.ref
        if ref is not None and (ref == me.user_id or not looks_like_id(ref, "usr")):
            ref = None  # a self-referral or a malformed one earns nothing; the purchase still goes through
        if not looks_like_id(sale_id, "sale"):
            raise NotFound("no such sale", code="sale_not_found")
        limits = [(PURCHASE_PER_USER, me.user_id)] + ([(PURCHASE_PER_IP, ip)] if ip is not None else [])
        with PURCHASE_SECONDS.time():
            outcome = await self._stock.reserve(sale_id, me.user_id, idem_key, new_order_id(sale_id), body.quantity,
                                                ref, limits)
        status = outcome.status
        PURCHASES.labels(status).inc()
        if status == "no_sale":
            raise NotFound("no such sale", code="sale_not_found")
        if status == "rate_limited":
            wait = outcome.retry_after_ms / 1000
            raise TooManyRequests(f"too many purchase attempts; retry in {wait:.1f}s", retry_after_s=wait)
        if status == "key_reused":
            raise Unprocessable("this Idempotency-Key was used for a different quantity", code="key_reused",
                                field="Idempotency-Key")
        if status == "reserved" or status == "duplicate":
            assert outcome.order is not None
            if status == "reserved" and outcome.remaining == 0:
                # This reservation took the last unit: exactly one caller sees 0 here.
                await self._tell_sold_out(sale_id, outcome.order, outcome.v)
            # For a duplicate too: perhaps a retry of a reservation whose answer was lost, whose
            # update the room has not had yet (the notifier sends at most one per tick anyway).
            self._notifier.touch(sale_id)
            return (201 if status == "reserved" else 200), order_out(sale_id, outcome.order, outcome.remaining)
        raise Conflict(REFUSAL_MESSAGES[status], code=status)

    async def _tell_sold_out(self, sale_id: str, order: OrderRecord, v: int) -> None:
        try:
            room_id = await self._stock.room_of(sale_id)
            if room_id is not None:
                await self._rooms.tell(room_id, protocol.SoldOut(id=sale_id, v=v))
        except REDIS_ERRORS as exc:
            # The order is made: its buyer gets it. Viewers see the stock at the next update.
            log.warning("sale %s: announcing order %s failed (%r)", sale_id, order.id, exc)

    # --- reading ---------------------------------------------------------------------------
    async def _mine(self, me: Principal, order_id: str) -> tuple[str, OrderRecord | None]:
        """The order's sale, and the order if it is in Redis (None: archived, see _archived)."""
        sale_id = sale_of(order_id)
        if sale_id is None:
            raise _no_order()
        o = await self._stock.order(sale_id, order_id)
        if o is not None and o.user_id != me.user_id:
            raise _no_order()
        return sale_id, o

    async def _archived(self, me: Principal, order_id: str) -> Order:
        """An order no longer in Redis (its sale settled and was archived): SQL has its last state."""
        async with self._db() as db:
            row = await db.get(Order, order_id)
        if row is None or row.buyer_id != me.user_id:
            raise _no_order()
        return row

    async def get(self, me: Principal, order_id: str) -> OrderOut:
        sale_id, o = await self._mine(me, order_id)
        return order_out(sale_id, o) if o is not None else order_row_out(await self._archived(me, order_id))

    async def of_buyer(self, me: Principal) -> list[OrderOut]:
        async with self._db() as db:
            rows = await db.scalars(select(Order).where(Order.buyer_id == me.user_id)
                                    .order_by(Order.created_at.desc()).limit(ORDERS_LISTED))
            return [order_row_out(r) for r in rows]

    # --- paying ----------------------------------------------------------------------------
    async def pay(self, me: Principal, order_id: str) -> OrderOut:
        sale_id, o = await self._mine(me, order_id)
        if o is None:  # archived: settled, so paid (and captured) or released long ago
            row = await self._archived(me, order_id)
            if row.status != "paid":
                raise not_payable(row.status)
            return order_row_out(row)
        if o.status == "paid":
            # Paid already, perhaps by a request whose answer was lost between the script and the
            # capture (a Redis timeout, a crash): if its capture is still owed, make it now.
            if await self._stock.capture_owed(sale_id, order_id):
                await self._capture(sale_id, order_id, Authorization(o.payment or "", o.total_cents))
            return order_out(sale_id, o)
        if o.status != "reserved" or o.pay_by <= int(time.time() * 1000):
            raise not_payable(o.status)
        try:
            async with asyncio.timeout(PROVIDER_TIMEOUT_S):
                auth = await self._payments.authorize(order_id, o.total_cents, me.user_id)
        except PaymentDeclined as exc:
            raise PaymentRequired(str(exc)) from None
        except Exception as exc:  # the provider failed or hung: the order is as it was (a hold it made lapses)
            log.error("order %s: authorizing the payment failed (%r)", order_id, exc)
            raise Unavailable("the payment provider did not answer; try again in a moment",
                              headers={"Retry-After": "5"}) from None
        outcome = await self._stock.pay(sale_id, order_id, me.user_id, auth.reference)
        if outcome.status == "no_order":
            # Paid by another request and archived while the provider was authorizing: the
            # reference that paid may be this one (authorize is idempotent per order).
            return await self._paid_meanwhile(me, order_id, auth)
        if outcome.status not in ("paid", "already_paid"):
            await self._void(auth)
            raise not_payable(outcome.status)
        assert outcome.order is not None
        paid_with = outcome.order.payment or ""
        if paid_with != auth.reference:
            await self._void(auth)  # paid meanwhile by another request, with another hold
        if outcome.status == "paid" or await self._stock.capture_owed(sale_id, order_id):
            await self._capture(sale_id, order_id, Authorization(paid_with, o.total_cents))
        self._notifier.touch(sale_id)  # also "already_paid": see purchase()
        return order_out(sale_id, outcome.order)

    async def _paid_meanwhile(self, me: Principal, order_id: str, auth: Authorization) -> OrderOut:
        """The order left Redis during the payment: SQL has its last state. Its hold is voided
        unless it is the one that paid (then it was captured before the sale could settle)."""
        try:
            row = await self._archived(me, order_id)
        except NotFound:
            await self._void(auth)
            raise
        if row.status == "paid" and row.payment_ref == auth.reference:
            return order_row_out(row)
        await self._void(auth)
        if row.status == "paid":
            return order_row_out(row)
        raise not_payable(row.status)

    async def _void(self, auth: Authorization) -> None:
        """Release a hold that paid nothing; if the provider fails, the hold lapses by itself."""
        try:
            async with asyncio.timeout(PROVIDER_TIMEOUT_S):
                await self._payments.void(auth)
        except Exception as exc:
            log.error("voiding authorization %s failed (%r); it lapses at the provider", auth.reference, exc)

    async def _capture(self, sale_id: str, order_id: str, auth: Authorization) -> None:
        """Capture in the paying request. The order is paid whatever happens here: if the provider
        fails, the capture stays owed (pay.lua made it due) and the jobs process makes it later."""
        try:
            async with asyncio.timeout(PROVIDER_TIMEOUT_S):
                await self._take(sale_id, order_id, auth)
        except Exception as exc:
            log.error("order %s: capture failed (%r); it stays owed for the jobs process", order_id, exc)

    async def _take(self, sale_id: str, order_id: str, auth: Authorization) -> None:
        await self._payments.capture(auth)
        await self._stock.captured(sale_id, order_id)

    async def capture_late(self, sale_id: str, order_id: str) -> bool:
        """Capture a paid order's payment that the request which paid it did not (pay.lua made it
        due); True if this call captured it. Raises if the provider fails."""
        o = await self._stock.order(sale_id, order_id)
        if o is None or o.status != "paid":
            log.error("sale %s: a capture was owed for order %s, which is %s; dropped", sale_id, order_id,
                      "missing" if o is None else o.status)
            await self._stock.captured(sale_id, order_id)
            return False
        await self._take(sale_id, order_id, Authorization(o.payment or "", o.total_cents))
        return True

    # --- cancelling ------------------------------------------------------------------------
    async def cancel(self, me: Principal, order_id: str) -> OrderOut:
        sale_id = sale_of(order_id)
        if sale_id is None:
            raise _no_order()
        outcome = await self._stock.release(sale_id, order_id, "cancelled", me.user_id)
        if outcome.status == "no_order" or outcome.order is None:
            row = await self._archived(me, order_id)
            if row.status != "cancelled":
                raise not_cancellable(row.status)
            return order_row_out(row)
        if outcome.status not in ("released", "cancelled"):
            raise not_cancellable(outcome.status)
        self._notifier.touch(sale_id)  # also "cancelled": see purchase()
        return order_out(sale_id, outcome.order)
