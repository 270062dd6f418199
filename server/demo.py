"""`livesale demo`: a host, a room and three products to try the app with."""

from __future__ import annotations

import msgspec
from sqlalchemy import select

from server.auth import hash_password
from server.backends.sql import make_engine, make_sessionmaker
from server.config import Settings
from server.errors import ConfigError
from server.ids import new_id
from server.models import Product, Room, User
from server.schemas import Username
from server.wiring import ensure_schema

PRODUCTS = [
    ("Jasmine green tea, 250 g", "Hand-rolled pearls from Fujian, spring harvest.", 2400, 2000, "/static/demo/tea.svg"),
    ("Ceramic pour-over set", "Dripper, server and two cups, stoneware.", 5900, 1500, "/static/demo/pourover.svg"),
    ("Linen tote bag", "Heavy washed linen, inside pocket.", 1800, 2500, "/static/demo/tote.svg"),
]


async def create_demo(settings: Settings, username: str, password: str) -> str:
    """Create (or refresh) the demo host; return the id of its open demo room."""
    try:  # the rules registration applies: a name the login form would refuse is no use
        msgspec.convert(username, Username)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"--username {username!r}: {exc}") from None
    await ensure_schema(settings)
    engine = make_engine(settings.database_url)
    try:
        async with make_sessionmaker(engine).begin() as db:
            host = await db.scalar(select(User).where(User.username == username.lower()))
            password_hash = await hash_password(password)
            if host is None:
                host = User(id=new_id("usr"), username=username.lower(), name=username, role="host",
                            password_hash=password_hash)
                db.add(host)
            elif host.role != "host" or host.password_hash is None:
                raise ConfigError(f"{username!r} is a viewer account; pick another --username")
            else:
                # A new password each run: the old one was only ever printed once.
                host.password_hash = password_hash
            room = await db.scalar(select(Room).where(Room.host_id == host.id, Room.status != "ended")
                                   .order_by(Room.created_at.desc()).limit(1))
            if room is None:
                room = Room(id=new_id("room"), host_id=host.id, title="Tea time: spring harvest flash sale",
                            status="scheduled")
                db.add(room)
            have = set((await db.scalars(select(Product.name).where(Product.host_id == host.id))).all())
            for name, description, price, rate, image in PRODUCTS:
                if name not in have:
                    db.add(Product(id=new_id("prd"), host_id=host.id, name=name, description=description,
                                   price_cents=price, commission_rate_bp=rate, image_url=image))
            return room.id
    finally:
        await engine.dispose()
