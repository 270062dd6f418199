"""A host's products: create, list, read, edit."""

from __future__ import annotations

import msgspec
from msgspec import UnsetType
from sqlalchemy import select

from server.api.endpoint import Call, Router
from server.catalog import get_owned_product, get_product, lineup, product_out
from server.ids import new_id
from server.inventory.ledger import check_commission
from server.models import Product, Room, RoomProduct
from server.rooms.protocol import Lineup
from server.schemas import ProductIn, ProductOut, ProductPatch

router = Router("products")


@router.endpoint("POST", "/api/products", auth="host", body=ProductIn, response=ProductOut, status=201)
async def create_product(call: Call[ProductIn]) -> ProductOut:
    """Create a product (hosts only)."""
    b = call.body
    check_commission(b.commission_rate_bp, call.services.settings.platform_fee_bp)
    product = Product(id=new_id("prd"), host_id=call.me.user_id, name=b.name, description=b.description,
                      image_url=b.image_url, price_cents=b.price_cents, commission_rate_bp=b.commission_rate_bp)
    async with call.services.db.begin() as db:
        db.add(product)
    return product_out(product)


@router.endpoint("GET", "/api/products", auth="host", response=list[ProductOut])
async def list_products(call: Call[None]) -> list[ProductOut]:
    """The caller's products, newest first."""
    async with call.services.db() as db:
        rows = await db.scalars(select(Product).where(Product.host_id == call.me.user_id)
                                .order_by(Product.created_at.desc(), Product.id))
        return [product_out(p) for p in rows]


@router.endpoint("GET", "/api/products/{product_id}", response=ProductOut, errors=(404,))
async def read_product(call: Call[None]) -> ProductOut:
    """One product."""
    async with call.services.db() as db:
        return product_out(await get_product(db, call.param("product_id")))


@router.endpoint("PATCH", "/api/products/{product_id}", auth="host", body=ProductPatch, response=ProductOut,
                 errors=(404,))
async def edit_product(call: Call[ProductPatch]) -> ProductOut:
    """Edit a product's fields (owner only). Running sales keep the price they launched with."""
    if not isinstance(call.body.commission_rate_bp, UnsetType):
        check_commission(call.body.commission_rate_bp, call.services.settings.platform_fee_bp)
    async with call.services.db.begin() as db:
        product = await get_owned_product(db, call.param("product_id"), call.me)
        call.body.apply_to(product)
    out = product_out(product)
    await _show_edit(call, out)
    return out


async def _show_edit(call: Call[ProductPatch], out: ProductOut) -> None:
    """The rooms showing the product (pinned, or in their lineup) show the edit: their viewers
    get a `pin` or `lineup` event, and the pinned copy a `welcome` carries is replaced."""
    async with call.services.db() as db:
        open_rooms = Room.status != "ended"
        pinned = (await db.scalars(select(Room.id).where(Room.pinned_product_id == out.id, open_rooms))).all()
        listed = (await db.scalars(select(RoomProduct.room_id).join(Room, Room.id == RoomProduct.room_id)
                                   .where(RoomProduct.product_id == out.id, open_rooms))).all()
        lineups = {room_id: await lineup(db, room_id) for room_id in set(listed)}
    for room_id in pinned:
        await call.services.rooms.pinned_edited(room_id, out)
    for room_id, products in lineups.items():
        await call.services.rooms.tell(room_id, Lineup(products=msgspec.to_builtins(products)))
