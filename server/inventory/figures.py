"""Sales figures of a room, from SQL (as persisted: a moment behind Redis)."""

from __future__ import annotations

from sqlalchemy import BigInteger, case, cast, distinct, func, select
from sqlalchemy.ext.asyncio import AsyncSession

from server.inventory.tables import LedgerEntry, Order, Sale


async def room_sales_figures(db: AsyncSession, room_id: str) -> dict[str, int]:
    paid = Order.status == "paid"
    row = (await db.execute(
        select(func.count(Order.id),
               func.sum(case((paid, 1), else_=0)),
               func.sum(case((paid, Order.quantity), else_=0)),
               # 64-bit: PostgreSQL multiplies two 32-bit columns in 32 bits (100 units at $1M overflow).
               func.sum(case((paid, cast(Order.quantity, BigInteger) * Order.unit_price_cents), else_=0)),
               func.count(distinct(Order.buyer_id)))
        .join(Sale, Sale.id == Order.sale_id).where(Sale.room_id == room_id))).one()
    commission = await db.scalar(select(func.sum(LedgerEntry.amount_cents)).where(
        LedgerEntry.room_id == room_id, LedgerEntry.kind == "host_commission"))
    orders, paid_orders, units, gmv, buyers = (int(x or 0) for x in row)
    return {"orders": orders, "paid_orders": paid_orders, "units_sold": units, "gmv_cents": gmv,
            "commission_cents": int(commission or 0), "buyers": buyers}
