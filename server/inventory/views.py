"""Sales and orders as the API and the room's events show them, and the answers refused
payments and cancellations get."""

from __future__ import annotations

import time
from typing import Literal

from server import clock
from server.errors import Conflict
from server.inventory.records import OrderRecord, SaleState
from server.inventory.schemas import OrderOut, SaleOut
from server.inventory.tables import Order


def _iso_ms(ms: int | None) -> str | None:
    return clock.iso_ms(ms) if ms else None


def sale_out(sale_id: str, state: SaleState, now_ms: int | None = None) -> SaleOut:
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    ended = state.ended_at > 0 or now_ms >= state.ends_at
    status: Literal["scheduled", "active", "ended"] = \
        "ended" if ended else "scheduled" if now_ms < state.starts_at else "active"
    return SaleOut(
        id=sale_id, room_id=state.room_id, product=state.info.product, status=status, price_cents=state.price, stock=state.stock, remaining=state.remaining,
        reserved=state.reserved, paid=state.paid, sold=state.sold, per_user_limit=state.limit,
        starts_at=_iso_ms(state.starts_at) or "", ends_at=_iso_ms(state.ends_at) or "",
        starts_at_ms=state.starts_at, ends_at_ms=state.ends_at, payment_timeout_s=state.timeout_ms // 1000,
        ended_at=_iso_ms(state.ended_at), end_reason=state.end_reason, v=state.v)


def order_out(sale_id: str, o: OrderRecord, remaining: int | None = None) -> OrderOut:
    out = OrderOut(order_id=o.id, sale_id=sale_id, status=o.status, quantity=o.quantity,
                   price_cents=o.price_cents, total_cents=o.total_cents, pay_by=_iso_ms(o.pay_by) or "",
                   created_at=_iso_ms(o.created_at) or "", paid_at=_iso_ms(o.paid_at),
                   released_at=_iso_ms(o.released_at))
    if remaining is not None:
        out.remaining = remaining
    return out


def order_row_out(row: Order) -> OrderOut:
    return OrderOut(order_id=row.id, sale_id=row.sale_id, status=row.status,  # type: ignore[arg-type]
                    quantity=row.quantity, price_cents=row.unit_price_cents,
                    total_cents=row.unit_price_cents * row.quantity, pay_by=clock.iso(row.pay_by) or "",
                    created_at=clock.iso(row.created_at) or "", paid_at=clock.iso(row.paid_at),
                    released_at=clock.iso(row.released_at))


def _order_is(status: str) -> Conflict:
    return Conflict(f"this order is {status}", code=status)


def not_payable(status: str) -> Conflict:
    """A payment of an order no longer reserved (or past its pay-by time): cancelled, or expired."""
    return _order_is("cancelled" if status == "cancelled" else "expired")


def not_cancellable(status: str) -> Conflict:
    """A cancellation of an order no longer reserved: paid, or expired."""
    return _order_is("paid" if status == "paid" else "expired")
