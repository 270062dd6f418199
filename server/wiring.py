"""The object graph of a process, built once at start-up.

The web app (server/app.py) and the jobs process (server/jobs.py) build the
same graph, so a job and a request see the same services; each runs its own
loops on it.
"""

from __future__ import annotations

from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis

from server.auth import Sessions
from server.catalog import describe_room, get_room
from server.config import Settings
from server.db import make_engine, make_sessionmaker
from server.errors import NotFound
from server.inventory.captures import LateCaptures
from server.inventory.notifier import SaleNotifier
from server.inventory.payments import SimulatedPayments
from server.inventory.persister import Persister
from server.inventory.sales import SaleService
from server.inventory.stock import Stock
from server.inventory.sweeper import Sweeper
from server.ratelimit import PerAddress, RateLimiter
from server.redis_pool import make_listener, make_redis
from server.rooms.broker import Broker
from server.rooms.hub import Hub
from server.rooms.service import RoomService, room_meta
from server.rooms.store import RoomStore
from server.services import Services

Loop = Coroutine[Any, Any, None]


@dataclass
class Wired:
    services: Services
    broker: Broker
    notifier: SaleNotifier
    listener: Redis

    def room_loops(self) -> dict[str, Loop]:
        """What serves viewers: the pub/sub listener, the hub's tick, sale updates."""
        return {"broker": self.broker.run(), "hub": self.services.hub.run(), "notifier": self.notifier.run()}

    def background_jobs(self) -> dict[str, Loop]:
        """Orders to SQL, the sales' clock (expiry, start, end), and payments left to capture."""
        s = self.services
        return {"persister": Persister(s.redis, s.sales.stock, s.db).run(),
                "sweeper": Sweeper(s.sales.stock, s.sales, self.notifier).run(),
                "captures": LateCaptures(s.sales.stock, s.sales).run()}

    async def close(self) -> None:
        self.services.sales.stock.disconnect()
        await self.listener.aclose(close_connection_pool=True)
        await self.services.redis.aclose(close_connection_pool=True)
        await self.services.db_engine.dispose()


async def wire(settings: Settings, redis_url: str) -> Wired:
    redis = make_redis(redis_url, settings.redis_max_connections)
    engine = make_engine(settings.database_url)
    db = make_sessionmaker(engine)

    async def load_meta(room_id: str) -> dict[str, Any] | None:
        async with db() as session:
            try:
                return room_meta(await describe_room(session, await get_room(session, room_id)))
            except NotFound:
                return None

    hub: Hub
    listener = make_listener(redis_url)  # connects only if the broker runs
    sessions = Sessions(settings.secret_key, settings.token_ttl_s, redis)
    broker = Broker(redis, listener, lambda room_id, data: hub.on_message(room_id, data), lambda: hub.resync(),
                    lambda session_ids: hub.end_sessions(session_ids), sessions)
    store = RoomStore(redis, broker)
    hub = Hub(store, broker, load_meta)
    await broker.detect()
    rooms = RoomService(store, broker)
    stock = Stock(redis, settings.deployment)
    notifier = SaleNotifier(redis, rooms)
    sales = SaleService(settings, stock, db, rooms, SimulatedPayments(), notifier)
    hub.load_sale = sales.snapshot
    services = Services(settings=settings, redis=redis, db_engine=engine, db=db, sessions=sessions,
                        limiter=RateLimiter(redis), hub=hub,
                        sockets=PerAddress(settings.max_sockets_per_address), rooms=rooms, sales=sales)
    return Wired(services=services, broker=broker, notifier=notifier, listener=listener)
