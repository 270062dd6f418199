"""A flash sale's life: launched in a room, read, ended (by its host, or with its room). Buying
and paying are server/inventory/orders.py; the sale's clock (its start and end by time) is the
sweeper's."""

from __future__ import annotations

import asyncio
from datetime import timedelta

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from server import clock
from server.auth import Principal
from server.catalog import get_owned_product, get_owned_room, get_room
from server.config import Settings
from server.errors import Conflict, Forbidden, NotFound, Unavailable
from server.ids import looks_like_id, new_id
from server.inventory.ledger import max_commission_bp
from server.inventory.records import SaleInfo, SaleState, Terms
from server.inventory.room_sales import RoomSales
from server.inventory.schemas import SaleIn, SaleOut, SaleProduct
from server.inventory.stock import Stock
from server.inventory.tables import Sale
from server.inventory.views import sale_out
from server.models import User
from server.rooms import protocol
from server.rooms.service import RoomService

# A launch waits at most this long (SQLite may wait 10 s for its write lock, at the insert and
# again at the commit); the room's launch lock outlives it, so two launches never interleave.
LAUNCH_TIMEOUT_S = 25.0
LAUNCH_LEASE_S = LAUNCH_TIMEOUT_S + 5.0
ROOM_SALES_LISTED = 50


class Sales:
    def __init__(self, settings: Settings, stock: Stock, room_sales: RoomSales, db: async_sessionmaker[AsyncSession],
                 rooms: RoomService) -> None:
        self._settings = settings
        self._stock = stock
        self._room_sales = room_sales
        self._db = db
        self._rooms = rooms

    async def _state(self, sale_id: str) -> SaleState:
        state = await self._stock.state(sale_id) if looks_like_id(sale_id, "sale") else None
        if state is None:
            raise NotFound("no such sale", code="sale_not_found")
        return state

    async def get(self, sale_id: str) -> SaleOut:
        return sale_out(sale_id, await self._state(sale_id))

    async def of_room(self, room_id: str) -> list[SaleOut]:
        """The room's sales, newest first."""
        async with self._db() as db:
            await get_room(db, room_id)
            ids = (await db.scalars(select(Sale.id).where(Sale.room_id == room_id)
                                    .order_by(Sale.created_at.desc()).limit(ROOM_SALES_LISTED))).all()
        states = [(i, await self._stock.state(i)) for i in ids]
        return [sale_out(i, s) for i, s in states if s is not None]

    async def in_room(self, room_id: str) -> SaleOut | None:
        """The room's current sale, as the `sale` event and `welcome` show it."""
        sale_id = await self._room_sales.current(room_id)
        state = await self._stock.state(sale_id) if sale_id is not None else None
        return sale_out(sale_id, state) if sale_id is not None and state is not None else None

    async def launch(self, me: Principal, room_id: str, body: SaleIn) -> SaleOut:
        async with self._db() as db:  # the owner's room, before its lock: nobody else may hold it
            await get_owned_room(db, room_id, me)
        async with self._room_sales.launch_lock(room_id, lease_s=LAUNCH_LEASE_S):
            try:
                async with asyncio.timeout(LAUNCH_TIMEOUT_S):  # ends well inside the lock's lease
                    return await self._launch(me, room_id, body)
            except TimeoutError:
                raise Unavailable("the launch took too long; check the room's sales, then try again") from None

    async def _launch(self, me: Principal, room_id: str, body: SaleIn) -> SaleOut:
        fee_bp = self._settings.platform_fee_bp
        async with self._db.begin() as db:
            # Locked: a room end racing this launch waits for it, then ends its sale too.
            room = await get_owned_room(db, room_id, me, lock=True)
            if room.status == "ended":
                raise Conflict("this room has ended", code="room_ended")
            product = await get_owned_product(db, body.product_id, me)
            if product.commission_rate_bp > max_commission_bp(fee_bp):
                # The platform's fee was raised since the product was priced: commission and fee
                # together would pay out more than the sale takes in.
                raise Conflict(f"this product's commission ({product.commission_rate_bp} bp) and the platform's "
                               f"fee ({fee_bp} bp) add up to more than the sale; lower the commission first",
                               code="commission_too_high")
            await self._check_open_sales(db, me)
            current = await self._room_sales.current(room.id)
            if current is not None:
                state = await self._stock.state(current)
                if state is not None and sale_out(current, state).status != "ended":
                    raise Conflict("a sale is already running in this room; end it first", code="sale_running")
            now = clock.from_ms(clock.to_ms(clock.utcnow()))  # whole milliseconds, as Redis keeps them
            starts_at = now + timedelta(seconds=body.starts_in_s)
            sale = Sale(id=new_id("sale"), room_id=room.id, product_id=product.id, host_id=me.user_id,
                        price_cents=body.price_cents, stock=body.stock, per_user_limit=body.per_user_limit,
                        commission_rate_bp=product.commission_rate_bp, platform_fee_bp=fee_bp,
                        referral_share_bp=self._settings.referral_share_bp, starts_at=starts_at,
                        ends_at=starts_at + timedelta(seconds=body.duration_s),
                        payment_timeout_s=body.payment_timeout_s)
            db.add(sale)
            info = SaleInfo(product=SaleProduct(id=product.id, name=product.name, description=product.description,
                                                image_url=product.image_url, list_price_cents=product.price_cents))
        # SQL first: from the moment the sale is in Redis the sweeper may announce it and buyers
        # may order, and the persister can only write orders of a sale that is in SQL. Then the
        # room's pointer, so that a sale in Redis is always the room's, whatever fails after
        # (a launch that failed anywhere leaves a sale that never opened, or one the host sees
        # in the room and can end; never a second one running). Nothing reads a sale that has
        # no Redis state.
        await self._room_sales.set_current(room.id, sale.id)
        await self._stock.create(Terms(
            sale_id=sale.id, room_id=room.id, stock=body.stock, per_user_limit=body.per_user_limit,
            price_cents=body.price_cents, starts_at_ms=clock.to_ms(starts_at),
            ends_at_ms=clock.to_ms(sale.ends_at), payment_timeout_ms=body.payment_timeout_s * 1000, info=info,
            started=body.starts_in_s == 0))
        out = await self.get(sale.id)
        await self._rooms.tell(room.id, protocol.Sale(sale=out))
        return out

    async def _check_open_sales(self, db: AsyncSession, me: Principal) -> None:
        """At most LIVESALE_MAX_OPEN_SALES_PER_HOST sales of one host not yet ended: each is
        watched by the jobs until it settles. The host's row is locked (on PostgreSQL) so that
        launches in several rooms at once cannot all pass the count."""
        await db.execute(select(User.id).where(User.id == me.user_id).with_for_update())
        open_now = await db.scalar(select(func.count()).select_from(Sale).where(
            Sale.host_id == me.user_id, Sale.ended_at.is_(None), Sale.ends_at > clock.utcnow()))
        limit = self._settings.max_open_sales_per_host
        if (open_now or 0) >= limit:
            raise Conflict(f"you have {open_now} sales open, the most one host may; end one first",
                           code="too_many_open_sales")

    async def end_room_sale(self, room_id: str) -> None:
        """The room ended: so does its sale (reserved orders may still be paid)."""
        sale_id = await self._room_sales.current(room_id)
        if sale_id is not None and await self._stock.state(sale_id) is not None:  # else it never opened
            await self._end(sale_id)

    async def _end(self, sale_id: str) -> SaleState:
        """End the sale and tell its room; the room is told also when the sale had ended already,
        perhaps by this very call (a script whose answer was lost and that ran again), so that
        no end goes untold (telling twice only repeats an event)."""
        await self._stock.end(sale_id, "host")
        state = await self._state(sale_id)
        await self._rooms.tell(state.room_id, protocol.SaleEnded(id=sale_id, reason=state.end_reason or "host",
                                                                 v=state.v))
        return state

    async def end(self, me: Principal, sale_id: str) -> SaleOut:
        await self._state(sale_id)  # 404 for an unknown sale before the SQL read
        async with self._db() as db:
            sale = await db.get(Sale, sale_id)
        if sale is None:
            raise NotFound("no such sale", code="sale_not_found")
        if sale.host_id != me.user_id:
            raise Forbidden("this sale belongs to another host", code="not_owner")
        return sale_out(sale_id, await self._end(sale_id))
