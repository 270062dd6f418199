"""SQL tables of the inventory layer. Orders and ledger entries are written by
the persister from the sale's Redis stream; `version` makes replays harmless."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, ForeignKey, Index, Integer, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from server.backends.sql import ID, Base, UTCDateTime
from server.clock import utcnow


class Sale(Base):
    __tablename__ = "sales"
    __table_args__ = (Index("ix_sales_room", "room_id", "created_at"),)

    id: Mapped[str] = mapped_column(ID, primary_key=True)
    room_id: Mapped[str] = mapped_column(ID, ForeignKey("rooms.id"))
    product_id: Mapped[str] = mapped_column(ID, ForeignKey("products.id"))
    host_id: Mapped[str] = mapped_column(ID, ForeignKey("users.id"))
    price_cents: Mapped[int] = mapped_column(Integer)
    stock: Mapped[int] = mapped_column(Integer)
    per_user_limit: Mapped[int] = mapped_column(Integer)
    # Rates fixed at launch, so later edits never change what a sale earned.
    commission_rate_bp: Mapped[int] = mapped_column(Integer)
    platform_fee_bp: Mapped[int] = mapped_column(Integer)
    referral_share_bp: Mapped[int] = mapped_column(Integer)
    starts_at: Mapped[datetime] = mapped_column(UTCDateTime)
    ends_at: Mapped[datetime] = mapped_column(UTCDateTime)
    payment_timeout_s: Mapped[int] = mapped_column(Integer)
    ended_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    end_reason: Mapped[str | None] = mapped_column(String(10))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Order(Base):
    __tablename__ = "orders"
    __table_args__ = (
        UniqueConstraint("sale_id", "buyer_id", "idempotency_key", name="uq_orders_idempotency"),
        Index("ix_orders_buyer", "buyer_id", "created_at"),
        Index("ix_orders_sale", "sale_id", "status"),
    )

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    sale_id: Mapped[str] = mapped_column(ID, ForeignKey("sales.id"))
    buyer_id: Mapped[str] = mapped_column(ID, ForeignKey("users.id"))
    quantity: Mapped[int] = mapped_column(Integer)
    unit_price_cents: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(10))  # reserved | paid | expired | cancelled
    ref_user_id: Mapped[str | None] = mapped_column(ID)
    idempotency_key: Mapped[str] = mapped_column(String(128))
    payment_ref: Mapped[str | None] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    pay_by: Mapped[datetime] = mapped_column(UTCDateTime)
    paid_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    released_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    version: Mapped[int] = mapped_column(Integer)


class LedgerEntry(Base):
    """One line of the commission ledger, in integer cents. One per (order, kind)."""
    __tablename__ = "ledger_entries"
    __table_args__ = (
        UniqueConstraint("order_id", "kind", name="uq_ledger_order_kind"),
        Index("ix_ledger_account", "account_id", "created_at"),
    )

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True,
                                    autoincrement=True)
    order_id: Mapped[str] = mapped_column(String(64), ForeignKey("orders.id"))
    sale_id: Mapped[str] = mapped_column(ID, ForeignKey("sales.id"))
    room_id: Mapped[str] = mapped_column(ID, ForeignKey("rooms.id"))
    # A user id, or "platform" for the service fee.
    account_id: Mapped[str] = mapped_column(ID)
    kind: Mapped[str] = mapped_column(String(20))  # host_commission | referral_share | platform_fee
    amount_cents: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
