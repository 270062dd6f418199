"""Tables for accounts, products and rooms. Inventory tables live in server/inventory/tables.py."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import ForeignKey, Index, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from server.backends.sql import ID, Base, UTCDateTime
from server.clock import utcnow


class User(Base):
    __tablename__ = "users"

    id: Mapped[str] = mapped_column(ID, primary_key=True)
    # Lower-cased for uniqueness; `name` keeps what the user typed.
    username: Mapped[str] = mapped_column(String(64), unique=True)
    name: Mapped[str] = mapped_column(String(64))
    role: Mapped[str] = mapped_column(String(10))  # "host" | "viewer"
    password_hash: Mapped[str | None] = mapped_column(String(255))  # None for guests
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    @property
    def is_guest(self) -> bool:
        return self.password_hash is None


class Product(Base):
    __tablename__ = "products"
    __table_args__ = (Index("ix_products_host", "host_id", "created_at"),)

    id: Mapped[str] = mapped_column(ID, primary_key=True)
    host_id: Mapped[str] = mapped_column(ID, ForeignKey("users.id"))
    name: Mapped[str] = mapped_column(String(120))
    description: Mapped[str] = mapped_column(Text, default="")
    image_url: Mapped[str | None] = mapped_column(String(2048))
    price_cents: Mapped[int] = mapped_column(Integer)
    commission_rate_bp: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)


class Room(Base):
    __tablename__ = "rooms"
    __table_args__ = (Index("ix_rooms_status", "status", "created_at"),)

    id: Mapped[str] = mapped_column(ID, primary_key=True)
    host_id: Mapped[str] = mapped_column(ID, ForeignKey("users.id"))
    title: Mapped[str] = mapped_column(String(120))
    stream_url: Mapped[str | None] = mapped_column(String(2048))
    status: Mapped[str] = mapped_column(String(10), default="scheduled")  # scheduled | live | ended
    pinned_product_id: Mapped[str | None] = mapped_column(ID, ForeignKey("products.id"))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    ended_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class RoomProduct(Base):
    """A room's lineup: the products shown to its viewers, in order."""
    __tablename__ = "room_products"

    room_id: Mapped[str] = mapped_column(ID, ForeignKey("rooms.id"), primary_key=True)
    product_id: Mapped[str] = mapped_column(ID, ForeignKey("products.id"), primary_key=True)
    position: Mapped[int] = mapped_column(Integer)
