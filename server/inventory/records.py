"""A sale and its orders as Redis holds them, typed, and what the stock scripts answer.

The scripts (reserve.lua, pay.lua, release.lua) write the order records; these types read them,
in the web processes, the persister and the reconciler alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from msgspec import Struct

from server.inventory.schemas import SaleProduct

OrderStatus = Literal["reserved", "paid", "expired", "cancelled"]
EndReason = Literal["host", "time"]

# What reserve.lua answers. A StockRefusal is a 409 whose `error` is the status itself; the load
# generator's verdict and docs/api.md use the same words.
StockRefusal = Literal["not_started", "ended", "limit_exceeded", "sold_out", "not_enough"]
ReserveStatus = Literal[Literal["reserved", "duplicate", "key_reused", "no_sale", "rate_limited"], StockRefusal]
PayStatus = Literal["paid", "already_paid", "no_order", "expired", "cancelled"]  # pay.lua
ReleaseStatus = Literal["released", "not_due", "no_order", OrderStatus]  # release.lua

REFUSAL_MESSAGES: dict[StockRefusal, str] = {
    "sold_out": "sold out",
    "not_enough": "not enough stock left for that quantity",
    "limit_exceeded": "that would pass this sale's per-buyer limit",
    "not_started": "the sale has not started yet",
    "ended": "the sale has ended",
}


class SaleInfo(Struct, kw_only=True):
    product: SaleProduct  # as the sale shows it, fixed at launch


class SaleState(Struct, kw_only=True):
    """The sale's hash ({sale:ID}): its terms, counters and version. Times in epoch ms."""
    room_id: str
    stock: int
    remaining: int
    reserved: int
    paid: int
    limit: int  # units per buyer
    price: int  # cents
    starts_at: int
    ends_at: int
    ended_at: int  # 0 until it ends
    timeout_ms: int  # to pay a reservation
    v: int
    info: SaleInfo
    end_reason: EndReason | None = None
    started_announced: int = 0  # 1 once the start was announced: by the launch, or by one sweeper
    archived_at: int = 0  # 0: its orders are still in Redis

    @property
    def sold(self) -> int:
        return self.reserved + self.paid


class OrderRecord(Struct, kw_only=True):
    """An order in the sale's orders hash and stream (JSON written by the scripts). Epoch ms."""
    id: str
    user_id: str
    quantity: int
    price_cents: int
    status: OrderStatus
    key: str  # the buyer's Idempotency-Key
    created_at: int
    pay_by: int
    v: int  # grows with every change: the persister keeps the highest
    ref: str | None = None  # who referred the buyer
    payment: str | None = None  # the provider's reference, once paid
    paid_at: int | None = None
    released_at: int | None = None

    @property
    def total_cents(self) -> int:
        return self.price_cents * self.quantity


@dataclass(frozen=True)
class Terms:
    """A new sale, as Stock.create writes it."""
    sale_id: str
    room_id: str
    stock: int
    per_user_limit: int
    price_cents: int
    starts_at_ms: int
    ends_at_ms: int
    payment_timeout_ms: int
    info: SaleInfo
    started: bool = False  # it opens at launch: the launch's event announces it, not the sweeper


@dataclass(frozen=True)
class Reservation:
    """reserve.lua's answer."""
    status: ReserveStatus
    order: OrderRecord | None
    remaining: int = 0
    v: int = 0  # the sale's version after the change
    retry_after_ms: int = 0  # when rate_limited


@dataclass(frozen=True)
class Change:
    """pay.lua's or release.lua's answer."""
    status: PayStatus | ReleaseStatus
    order: OrderRecord | None
    remaining: int = 0
