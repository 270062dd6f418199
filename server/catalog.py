"""Rooms and products: lookups with ownership checks, and their wire shapes.

Shared by the HTTP API, the room layer (welcome state, pins) and the
inventory layer (what a sale sells).
"""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from server import clock
from server.auth import Principal
from server.errors import Forbidden, NotFound
from server.ids import looks_like_id
from server.models import Product, Room, RoomProduct, User
from server.schemas import HostOut, ProductOut, RoomOut


def product_out(p: Product) -> ProductOut:
    return ProductOut(id=p.id, host_id=p.host_id, name=p.name, description=p.description,
                      image_url=p.image_url, price_cents=p.price_cents,
                      commission_rate_bp=p.commission_rate_bp,
                      created_at=clock.iso(p.created_at) or "", updated_at=clock.iso(p.updated_at) or "")


def room_out(room: Room, host: User, pinned: Product | None) -> RoomOut:
    return RoomOut(id=room.id, title=room.title, stream_url=room.stream_url,
                   status=room.status,  # type: ignore[arg-type]
                   host=HostOut(id=host.id, name=host.name),
                   pinned_product=product_out(pinned) if pinned is not None else None,
                   url=f"/rooms/{room.id}", created_at=clock.iso(room.created_at) or "",
                   started_at=clock.iso(room.started_at), ended_at=clock.iso(room.ended_at))


async def get_product(db: AsyncSession, product_id: str) -> Product:
    product = await db.get(Product, product_id) if looks_like_id(product_id, "prd") else None
    if product is None:
        raise NotFound("no such product", code="product_not_found")
    return product


async def get_owned_product(db: AsyncSession, product_id: str, me: Principal) -> Product:
    product = await get_product(db, product_id)
    if product.host_id != me.user_id:
        raise Forbidden("this product belongs to another host", code="not_owner")
    return product


async def get_room(db: AsyncSession, room_id: str, *, lock: bool = False) -> Room:
    """The room; with `lock`, its row stays locked until the transaction ends (PostgreSQL: FOR NO KEY
    UPDATE, so writers of one room take turns and a sale's foreign key to it is not blocked;
    SQLite has one writer at a time anyway)."""
    room = None
    if looks_like_id(room_id, "room"):
        # populate_existing: a room already in the session is read again under the lock, not reused.
        room = await db.get(Room, room_id, with_for_update={"key_share": True} if lock else None,
                            populate_existing=lock)
    if room is None:
        raise NotFound("no such room", code="room_not_found")
    return room


async def get_owned_room(db: AsyncSession, room_id: str, me: Principal, *, lock: bool = False) -> Room:
    room = await get_room(db, room_id, lock=lock)
    if room.host_id != me.user_id:
        raise Forbidden("this room belongs to another host", code="not_owner")
    return room


async def lineup(db: AsyncSession, room_id: str) -> list[ProductOut]:
    rows = await db.scalars(select(Product).join(RoomProduct, RoomProduct.product_id == Product.id)
                            .where(RoomProduct.room_id == room_id).order_by(RoomProduct.position))
    return [product_out(p) for p in rows]


async def describe_room(db: AsyncSession, room: Room) -> RoomOut:
    host = await db.get(User, room.host_id)
    assert host is not None  # foreign key
    pinned = await db.get(Product, room.pinned_product_id) if room.pinned_product_id else None
    return room_out(room, host, pinned)


async def describe_rooms(db: AsyncSession, rooms: list[Room]) -> list[RoomOut]:
    host_ids = {r.host_id for r in rooms}
    product_ids = {r.pinned_product_id for r in rooms if r.pinned_product_id}
    hosts = {u.id: u for u in (await db.scalars(select(User).where(User.id.in_(host_ids)))).all()} \
        if host_ids else {}
    products = {p.id: p for p in (await db.scalars(select(Product).where(Product.id.in_(product_ids)))).all()} \
        if product_ids else {}
    return [room_out(r, hosts[r.host_id], products.get(r.pinned_product_id or "")) for r in rooms]


async def find_room(db: async_sessionmaker[AsyncSession], room_id: str) -> RoomOut | None:
    """The room as the API shows it, or None if there is no such room."""
    async with db() as session:
        try:
            return await describe_room(session, await get_room(session, room_id))
        except NotFound:
            return None
