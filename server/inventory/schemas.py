"""HTTP wire types of sales, orders and earnings."""

from __future__ import annotations

from typing import Annotated, Literal

from msgspec import UNSET, Meta, Struct, UnsetType

from server.schemas import Input, PriceCents, Timestamp


class SaleIn(Input):
    product_id: Annotated[str, Meta(max_length=64)]
    price_cents: PriceCents
    stock: Annotated[int, Meta(ge=1, le=1_000_000)]
    per_user_limit: Annotated[int, Meta(ge=1, le=100)]
    duration_s: Annotated[int, Meta(ge=1, le=7 * 24 * 3600)]
    starts_in_s: Annotated[int, Meta(ge=0, le=7 * 24 * 3600)] = 0
    payment_timeout_s: Annotated[int, Meta(ge=1, le=24 * 3600)] = 900


class SaleProduct(Struct, kw_only=True):
    id: str
    name: str
    description: str
    image_url: str | None
    list_price_cents: int


class SaleOut(Struct, kw_only=True):
    id: str
    room_id: str
    product: SaleProduct
    status: Literal["scheduled", "active", "ended"]
    price_cents: int
    stock: int
    remaining: int
    reserved: int
    paid: int
    sold: int  # reserved + paid: units taken
    per_user_limit: int
    starts_at: Timestamp
    ends_at: Timestamp
    starts_at_ms: int
    ends_at_ms: int
    payment_timeout_s: int
    ended_at: Timestamp | None
    end_reason: Literal["host", "time"] | None
    v: int  # grows with every change: a client keeps the highest it has seen


class PurchaseIn(Input):
    quantity: Annotated[int, Meta(ge=1, le=100)] = 1
    ref: Annotated[str, Meta(max_length=64)] | None = None


OrderStatus = Literal["reserved", "paid", "expired", "cancelled"]


class OrderOut(Struct, kw_only=True):
    order_id: str
    sale_id: str
    status: OrderStatus
    quantity: int
    price_cents: int
    total_cents: int
    pay_by: Timestamp
    created_at: Timestamp
    paid_at: Timestamp | None = None
    released_at: Timestamp | None = None
    remaining: int | UnsetType = UNSET  # stock left, on purchase answers


class LedgerLine(Struct, kw_only=True):
    order_id: str
    sale_id: str
    room_id: str
    kind: Literal["host_commission", "referral_share", "platform_fee"]
    amount_cents: int
    created_at: Timestamp


class EarningsOut(Struct, kw_only=True):
    total_cents: int
    host_commission_cents: int
    referral_share_cents: int
    entries: list[LedgerLine]
