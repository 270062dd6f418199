"""Flash sales: launch, buy, pay, cancel, end. Orchestrates the Redis stock,
SQL, the payment provider and the room's events.

The purchase path touches only Redis (one script call, rate limits included):
orders reach SQL through the persister, never on the buyer's clock.
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import timedelta
from typing import Any, Literal

import msgspec
from redis.exceptions import RedisError
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from server import clock
from server.auth import Principal
from server.catalog import get_owned_product, get_owned_room, max_commission_bp
from server.config import Settings
from server.errors import (Conflict, Forbidden, NotFound, PaymentRequired, TooManyRequests, Unavailable,
                           Unprocessable)
from server.ids import looks_like_id, new_id
from server.inventory.notifier import SaleNotifier
from server.inventory.payments import TIMEOUT_S as PROVIDER_TIMEOUT_S, Authorization, PaymentDeclined, PaymentProvider
from server.inventory.schemas import OrderOut, PurchaseIn, SaleIn, SaleOut, SaleProduct
from server.inventory.stock import Outcome, Stock, Terms, new_order_id, sale_of
from server.inventory.tables import Order, Sale
from server.metrics import PURCHASE_SECONDS, PURCHASES
from server.ratelimit import PURCHASE_PER_IP, PURCHASE_PER_USER
from server.rooms import protocol
from server.rooms.service import RoomService

log = logging.getLogger("livesale.inventory.sales")

# A launch waits at most this long (SQLite may wait 10 s for its write lock, at the insert and
# again at the commit); the room's launch lock outlives it, so two launches never interleave.
LAUNCH_TIMEOUT_S = 25.0
LAUNCH_LEASE_S = LAUNCH_TIMEOUT_S + 5.0

_REFUSALS = {
    "sold_out": "sold out",
    "not_enough": "not enough stock left for that quantity",
    "limit_exceeded": "that would pass this sale's per-buyer limit",
    "not_started": "the sale has not started yet",
    "ended": "the sale has ended",
}


def _iso_ms(ms: int | None) -> str | None:
    return clock.iso_ms(ms) if ms else None


def sale_out(sale_id: str, state: dict[str, Any], now_ms: int | None = None) -> SaleOut:
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    ended = state["ended_at"] > 0 or now_ms >= state["ends_at"]
    status: Literal["scheduled", "active", "ended"] = \
        "ended" if ended else "scheduled" if now_ms < state["starts_at"] else "active"
    info = state["info"]
    return SaleOut(
        id=sale_id, room_id=state["room_id"], product=SaleProduct(**info["product"]), status=status,
        price_cents=state["price"], stock=state["stock"], remaining=state["remaining"],
        reserved=state["reserved"], paid=state["paid"], sold=state["reserved"] + state["paid"],
        per_user_limit=state["limit"], starts_at=_iso_ms(state["starts_at"]) or "",
        ends_at=_iso_ms(state["ends_at"]) or "", starts_at_ms=state["starts_at"], ends_at_ms=state["ends_at"],
        payment_timeout_s=state["timeout_ms"] // 1000, ended_at=_iso_ms(state["ended_at"]),
        end_reason=state["end_reason"], v=state["v"])


def order_out(sale_id: str, o: dict[str, Any], remaining: int | None = None) -> OrderOut:
    out = OrderOut(order_id=o["id"], sale_id=sale_id, status=o["status"], quantity=o["quantity"],
                   price_cents=o["price_cents"], total_cents=o["price_cents"] * o["quantity"],
                   pay_by=_iso_ms(o["pay_by"]) or "", created_at=_iso_ms(o["created_at"]) or "",
                   paid_at=_iso_ms(o.get("paid_at")), released_at=_iso_ms(o.get("released_at")))
    if remaining is not None:
        out.remaining = remaining
    return out


def order_row_out(row: Order) -> OrderOut:
    return OrderOut(order_id=row.id, sale_id=row.sale_id, status=row.status,  # type: ignore[arg-type]
                    quantity=row.quantity, price_cents=row.unit_price_cents,
                    total_cents=row.unit_price_cents * row.quantity, pay_by=clock.iso(row.pay_by) or "",
                    created_at=clock.iso(row.created_at) or "", paid_at=clock.iso(row.paid_at),
                    released_at=clock.iso(row.released_at))


class SaleService:
    def __init__(self, settings: Settings, stock: Stock, db: async_sessionmaker[AsyncSession],
                 rooms: RoomService, payments: PaymentProvider, notifier: SaleNotifier) -> None:
        self.settings = settings
        self.stock = stock
        self.db = db
        self.rooms = rooms
        self.payments = payments
        self.notifier = notifier
        self._rooms: dict[str, str] = {}  # sale -> room; never changes

    async def _state(self, sale_id: str) -> dict[str, Any]:
        state = await self.stock.state(sale_id) if looks_like_id(sale_id, "sale") else None
        if state is None:
            raise NotFound("no such sale", code="sale_not_found")
        return state

    async def snapshot(self, sale_id: str) -> dict[str, Any] | None:
        """The sale as the `sale` event and `welcome` show it."""
        state = await self.stock.state(sale_id)
        return msgspec.to_builtins(sale_out(sale_id, state)) if state else None

    async def get(self, sale_id: str) -> SaleOut:
        return sale_out(sale_id, await self._state(sale_id))

    async def launch(self, me: Principal, room_id: str, body: SaleIn) -> SaleOut:
        async with self.db() as db:  # the owner's room, before its lock: nobody else may hold it
            await get_owned_room(db, room_id, me)
        async with self.rooms.store.launch_lock(room_id, lease_s=LAUNCH_LEASE_S):
            try:
                async with asyncio.timeout(LAUNCH_TIMEOUT_S):  # ends well inside the lock's lease
                    return await self._launch(me, room_id, body)
            except TimeoutError:
                raise Unavailable("the launch took too long; check the room's sales, then try again") from None

    async def _launch(self, me: Principal, room_id: str, body: SaleIn) -> SaleOut:
        async with self.db.begin() as db:
            # Locked: a room end racing this launch waits for it, then ends its sale too.
            room = await get_owned_room(db, room_id, me, lock=True)
            if room.status == "ended":
                raise Conflict("this room has ended", code="room_ended")
            product = await get_owned_product(db, body.product_id, me)
            if product.commission_rate_bp > max_commission_bp(self.settings.platform_fee_bp):
                # The platform's fee was raised since the product was priced: commission and fee
                # together would pay out more than the sale takes in.
                raise Conflict(f"this product's commission ({product.commission_rate_bp} bp) and the platform's "
                               f"fee ({self.settings.platform_fee_bp} bp) add up to more than the sale; "
                               "lower the commission first", code="commission_too_high")
            current = await self.rooms.store.active_sale(room.id)
            if current is not None:
                state = await self.stock.state(current)
                if state is not None and sale_out(current, state).status != "ended":
                    raise Conflict("a sale is already running in this room; end it first", code="sale_running")
            now = clock.from_ms(clock.to_ms(clock.utcnow()))  # whole milliseconds, as Redis keeps them
            starts_at = now + timedelta(seconds=body.starts_in_s)
            sale = Sale(id=new_id("sale"), room_id=room.id, product_id=product.id, host_id=me.user_id,
                        price_cents=body.price_cents, stock=body.stock, per_user_limit=body.per_user_limit,
                        commission_rate_bp=product.commission_rate_bp,
                        platform_fee_bp=self.settings.platform_fee_bp,
                        referral_share_bp=self.settings.referral_share_bp, starts_at=starts_at,
                        ends_at=starts_at + timedelta(seconds=body.duration_s),
                        payment_timeout_s=body.payment_timeout_s)
            db.add(sale)
            info = {"product": {"id": product.id, "name": product.name, "description": product.description,
                                "image_url": product.image_url, "list_price_cents": product.price_cents}}
        # SQL first: from the moment the sale is in Redis the sweeper may announce it and buyers
        # may order, and the persister can only write orders of a sale that is in SQL. Then the
        # room's pointer, so that a sale in Redis is always the room's, whatever fails after
        # (a launch that failed anywhere leaves a sale that never opened, or one the host sees
        # in the room and can end; never a second one running). Nothing reads a sale that has
        # no Redis state.
        await self.rooms.store.set_active_sale(room.id, sale.id)
        await self.stock.create(Terms(
            sale_id=sale.id, room_id=room.id, stock=body.stock, per_user_limit=body.per_user_limit,
            price_cents=body.price_cents, starts_at_ms=clock.to_ms(starts_at),
            ends_at_ms=clock.to_ms(sale.ends_at), payment_timeout_ms=body.payment_timeout_s * 1000, info=info))
        out = await self.get(sale.id)
        await self.rooms.tell(room.id, protocol.Sale(sale=out))
        return out

    async def end_room_sale(self, room_id: str) -> None:
        """The room ended: so does its sale (reserved orders may still be paid)."""
        sale_id = await self.rooms.store.active_sale(room_id)
        if sale_id is not None and await self.stock.state(sale_id) is not None:  # else it never opened
            await self._end(sale_id)

    async def _end(self, sale_id: str) -> dict[str, Any]:
        """End the sale and tell its room; the room is told also when the sale had ended already,
        perhaps by this very call (a script whose answer was lost and that ran again), so that
        no end goes untold (telling twice only repeats an event)."""
        await self.stock.end(sale_id, "host")
        state = await self._state(sale_id)
        await self.rooms.tell(state["room_id"], protocol.SaleEnded(id=sale_id, reason=state["end_reason"] or "host",
                                                                   v=state["v"]))
        return state

    async def end(self, me: Principal, sale_id: str) -> SaleOut:
        await self._state(sale_id)  # 404 for an unknown sale before the SQL read
        async with self.db() as db:
            sale = await db.get(Sale, sale_id)
        if sale is None:
            raise NotFound("no such sale", code="sale_not_found")
        if sale.host_id != me.user_id:
            raise Forbidden("this sale belongs to another host", code="not_owner")
        return sale_out(sale_id, await self._end(sale_id))

    async def purchase(self, me: Principal, sale_id: str, idem_key: str, body: PurchaseIn,
                       ip: str | None) -> tuple[int, OrderOut]:
        """Reserve, within the buyer's purchase rate limits: per user, and per address unless `ip`
        is None (an exempt address)."""
        ref = body.ref
        if ref is not None and (ref == me.user_id or not looks_like_id(ref, "usr")):
            ref = None  # a self-referral or a malformed one earns nothing; the purchase still goes through
        if not looks_like_id(sale_id, "sale"):
            raise NotFound("no such sale", code="sale_not_found")
        limits = [(PURCHASE_PER_USER, me.user_id)] + ([(PURCHASE_PER_IP, ip)] if ip is not None else [])
        with PURCHASE_SECONDS.time():
            outcome = await self.stock.reserve(sale_id, me.user_id, idem_key, new_order_id(sale_id), body.quantity,
                                               ref, limits)
        PURCHASES.labels(outcome.status).inc()
        if outcome.status == "no_sale":
            raise NotFound("no such sale", code="sale_not_found")
        if outcome.status == "rate_limited":
            wait = outcome.retry_after_ms / 1000
            raise TooManyRequests(f"too many purchase attempts; retry in {wait:.1f}s", retry_after_s=wait)
        if outcome.status == "key_reused":
            raise Unprocessable("this Idempotency-Key was used for a different quantity", code="key_reused",
                                field="Idempotency-Key")
        if outcome.status in _REFUSALS:
            raise Conflict(_REFUSALS[outcome.status], code=outcome.status)
        assert outcome.order is not None
        if outcome.status == "reserved":
            try:
                await self._announce(sale_id, outcome)
            except RedisError as exc:
                # The order is made: its buyer gets it. Viewers see the stock at the next update.
                log.warning("sale %s: announcing order %s failed (%r)", sale_id, outcome.order["id"], exc)
            return 201, order_out(sale_id, outcome.order, outcome.remaining)
        # The same key again; perhaps a retry of a reservation whose answer was lost, whose
        # update the room has not had yet (the notifier sends at most one per tick anyway).
        self.notifier.touch(sale_id, await self._room_of(sale_id))
        return 200, order_out(sale_id, outcome.order, outcome.remaining)

    async def _room_of(self, sale_id: str) -> str:
        room_id = self._rooms.get(sale_id)
        if room_id is None:
            room_id = self._rooms[sale_id] = (await self._state(sale_id))["room_id"]
        return room_id

    async def _announce(self, sale_id: str, outcome: Outcome) -> None:
        room_id = await self._room_of(sale_id)
        if outcome.remaining == 0:
            # This reservation took the last unit: exactly one caller sees 0 here.
            await self.rooms.tell(room_id, protocol.SoldOut(id=sale_id, v=outcome.v))
        self.notifier.touch(sale_id, room_id)

    def _order_sale(self, order_id: str) -> str:
        sale_id = sale_of(order_id)
        if sale_id is None:
            raise NotFound("no such order", code="order_not_found")
        return sale_id

    async def order(self, me: Principal, order_id: str) -> OrderOut:
        sale_id = self._order_sale(order_id)
        o = await self.stock.order(sale_id, order_id)
        if o is None:
            return order_row_out(await self._archived_order(me, order_id))
        if o["user_id"] != me.user_id:
            raise NotFound("no such order", code="order_not_found")
        return order_out(sale_id, o)

    async def _archived_order(self, me: Principal, order_id: str) -> Order:
        """An order no longer in Redis (its sale settled and was archived): SQL has its last state."""
        async with self.db() as db:
            row = await db.get(Order, order_id)
        if row is None or row.buyer_id != me.user_id:
            raise NotFound("no such order", code="order_not_found")
        return row

    async def pay(self, me: Principal, order_id: str) -> OrderOut:
        sale_id = self._order_sale(order_id)
        o = await self.stock.order(sale_id, order_id)
        if o is None:  # archived: settled, so paid (and captured) or released long ago
            row = await self._archived_order(me, order_id)
            if row.status != "paid":
                code = "cancelled" if row.status == "cancelled" else "expired"
                raise Conflict(f"this order is {code}", code=code)
            return order_row_out(row)
        if o["user_id"] != me.user_id:
            raise NotFound("no such order", code="order_not_found")
        amount = o["price_cents"] * o["quantity"]
        if o["status"] == "paid":
            # Paid already, perhaps by a request whose answer was lost between the script and the
            # capture (a Redis timeout, a crash): if its capture is still owed, make it now.
            if await self.stock.capture_owed(sale_id, order_id):
                await self._capture(sale_id, order_id, Authorization(o["payment"], amount))
            return order_out(sale_id, o)
        if o["status"] != "reserved" or o["pay_by"] <= int(time.time() * 1000):
            code = "cancelled" if o["status"] == "cancelled" else "expired"
            raise Conflict(f"this order is {code}", code=code)
        try:
            async with asyncio.timeout(PROVIDER_TIMEOUT_S):
                auth = await self.payments.authorize(order_id, amount, me.user_id)
        except PaymentDeclined as exc:
            raise PaymentRequired(str(exc)) from None
        except Exception as exc:  # the provider failed or hung: the order is as it was (a hold it made lapses)
            log.error("order %s: authorizing the payment failed (%r)", order_id, exc)
            raise Unavailable("the payment provider did not answer; try again in a moment",
                              headers={"Retry-After": "5"}) from None
        outcome = await self.stock.pay(sale_id, order_id, me.user_id, auth.reference)
        if outcome.status == "no_order":
            # Paid by another request and archived while the provider was authorizing: the
            # reference that paid may be this one (authorize is idempotent per order).
            return await self._paid_meanwhile(me, order_id, auth)
        if outcome.status not in ("paid", "already_paid"):
            await self._void(auth)
            code = "cancelled" if outcome.status == "cancelled" else "expired"
            raise Conflict(f"this order is {code}", code=code)
        assert outcome.order is not None
        paid_with = outcome.order["payment"]
        if paid_with != auth.reference:
            await self._void(auth)  # paid meanwhile by another request, with another hold
        if outcome.status == "paid" or await self.stock.capture_owed(sale_id, order_id):
            await self._capture(sale_id, order_id, Authorization(paid_with, amount))
        self.notifier.touch(sale_id, await self._room_of(sale_id))  # also "already_paid": see purchase()
        return order_out(sale_id, outcome.order)

    async def _paid_meanwhile(self, me: Principal, order_id: str, auth: Authorization) -> OrderOut:
        """The order left Redis during the payment: SQL has its last state. Its hold is voided
        unless it is the one that paid (then it was captured before the sale could settle)."""
        try:
            row = await self._archived_order(me, order_id)
        except NotFound:
            await self._void(auth)
            raise
        if row.status == "paid" and row.payment_ref == auth.reference:
            return order_row_out(row)
        await self._void(auth)
        if row.status == "paid":
            return order_row_out(row)
        code = "cancelled" if row.status == "cancelled" else "expired"
        raise Conflict(f"this order is {code}", code=code)

    async def _void(self, auth: Authorization) -> None:
        """Release a hold that paid nothing; if the provider fails, the hold lapses by itself."""
        try:
            async with asyncio.timeout(PROVIDER_TIMEOUT_S):
                await self.payments.void(auth)
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
        await self.payments.capture(auth)
        await self.stock.captured(sale_id, order_id)

    async def capture_late(self, sale_id: str, order_id: str) -> bool:
        """Capture a paid order's payment that the request which paid it did not (pay.lua made it
        due); True if this call captured it. Raises if the provider fails."""
        o = await self.stock.order(sale_id, order_id)
        if o is None or o["status"] != "paid":
            log.error("sale %s: a capture was owed for order %s, which is %s; dropped", sale_id, order_id,
                      "missing" if o is None else o["status"])
            await self.stock.captured(sale_id, order_id)
            return False
        await self._take(sale_id, order_id, Authorization(o["payment"], o["price_cents"] * o["quantity"]))
        return True

    async def cancel(self, me: Principal, order_id: str) -> OrderOut:
        sale_id = self._order_sale(order_id)
        outcome = await self.stock.release(sale_id, order_id, "cancelled", me.user_id)
        if outcome.status == "no_order" or outcome.order is None:
            row = await self._archived_order(me, order_id)
            if row.status != "cancelled":
                code = "paid" if row.status == "paid" else "expired"
                raise Conflict(f"this order is {code}", code=code)
            return order_row_out(row)
        if outcome.status not in ("released", "cancelled"):
            raise Conflict(f"this order is {outcome.status}", code=outcome.status)
        self.notifier.touch(sale_id, await self._room_of(sale_id))  # also "cancelled": see purchase()
        return order_out(sale_id, outcome.order)

    async def orders_of(self, me: Principal, limit: int = 100) -> list[OrderOut]:
        async with self.db() as db:
            rows = await db.scalars(select(Order).where(Order.buyer_id == me.user_id)
                                    .order_by(Order.created_at.desc()).limit(limit))
            return [order_row_out(r) for r in rows]
