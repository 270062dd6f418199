"""The object graph of each kind of process, built once at start-up, every collaborator passed
in when its user is made.

A web worker (server/app.py) gets `Services`: what request handlers and sockets use, and the
loops that serve viewers. The jobs process (server/jobs.py) gets `Jobs`: the persister, the
sweeper and the late captures, with no hub and no pub/sub listener. Both share one core: the
Redis client, SQL, the room service and the inventory.
"""

from __future__ import annotations

import asyncio
import functools
import os
import socket
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

from sqlalchemy.exc import OperationalError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

import server.inventory.tables  # noqa: F401  (the tables ensure_schema creates)
import server.models  # noqa: F401
from server import heartbeat
from server.auth import Sessions
from server.backends import redis_client
from server.backends.embedded_valkey import EmbeddedValkey
from server.backends.redis_client import REDIS_ERRORS, RedisClient, make_redis
from server.backends.redis_nodes import Nodes
from server.backends.sql import create_schema, make_engine, make_sessionmaker
from server.catalog import find_room
from server.config import Settings
from server.errors import ConfigError
from server.inventory.captures import LateCaptures
from server.inventory.notifier import SaleNotifier
from server.inventory.orders import Orders
from server.inventory.payments import SimulatedPayments
from server.inventory.persister import Persister
from server.inventory.room_sales import RoomSales
from server.inventory.sales import Sales
from server.inventory.stock import Stock
from server.inventory.sweeper import Sweeper
from server.inventory.watch import SaleWatch
from server.ratelimit import LoginGuard, PerAddress, RateLimiter
from server.rooms.broker import Broker
from server.rooms.hub import Hub
from server.rooms.publisher import Publisher
from server.rooms.service import BannedWords, RoomService
from server.rooms.store import RoomStore
from server.rooms.welcome import Welcomes

Loop = Coroutine[Any, Any, None]


def redis_url(settings: Settings) -> str:
    """REDIS_URL, or the embedded engine that `livesale serve` runs for the data dir."""
    if settings.redis_url is not None:
        return settings.redis_url
    engine = EmbeddedValkey(settings.data_dir)
    if not engine.socket_path.exists():
        raise ConfigError(f"no REDIS_URL, and no embedded Valkey running for {settings.data_dir}: "
                          "start `livesale serve` (it runs one), or set REDIS_URL")
    return engine.url


async def check_redis(settings: Settings) -> None:
    """Before any worker starts: a REDIS_URL that cannot work is said at once (ConfigError)."""
    redis = make_redis(redis_url(settings), 2)
    try:
        await redis_client.check_topology(redis)
    finally:
        await redis_client.close(redis)


async def ensure_schema(settings: Settings) -> None:
    """Create the tables that are missing."""
    engine = make_engine(settings.database_url)
    try:
        for attempt in range(5):
            try:
                await create_schema(engine)
                return
            except OperationalError:
                # Several workers starting at once may race on CREATE TABLE; the
                # loser retries and finds the tables there.
                if attempt == 4:
                    raise
                await asyncio.sleep(0.2 * (attempt + 1))
    finally:
        await engine.dispose()


@dataclass
class _Core:
    redis: RedisClient
    db_engine: AsyncEngine
    db: async_sessionmaker[AsyncSession]
    publisher: Publisher
    store: RoomStore
    banned: BannedWords
    rooms: RoomService
    stock: Stock
    notifier: SaleNotifier
    sales: Sales
    orders: Orders

    async def close(self) -> None:
        self.stock.disconnect()
        await redis_client.close(self.redis)
        await self.db_engine.dispose()


async def _core(settings: Settings, url: str) -> _Core:
    redis = make_redis(url, settings.redis_max_connections)
    engine = make_engine(settings.database_url)
    db = make_sessionmaker(engine)
    await redis_client.check_topology(redis)
    publisher = await Publisher.detect(redis)
    store = RoomStore(redis, publisher)
    banned = BannedWords(store)
    rooms = RoomService(store, publisher, banned)
    stock = Stock(redis, settings.deployment, replica_acks=settings.redis_replica_acks)
    notifier = SaleNotifier(stock, rooms)
    return _Core(redis=redis, db_engine=engine, db=db, publisher=publisher, store=store, banned=banned, rooms=rooms,
                 stock=stock, notifier=notifier, sales=Sales(settings, stock, RoomSales(redis), db, rooms),
                 orders=Orders(stock, db, SimulatedPayments(), notifier, rooms))


@dataclass
class Services:
    """A web worker's long-lived objects: what a request handler or a socket may use."""
    settings: Settings
    redis: RedisClient
    db_engine: AsyncEngine
    db: async_sessionmaker[AsyncSession]
    sessions: Sessions
    limiter: RateLimiter
    logins: LoginGuard
    sockets: PerAddress  # this process's room sockets per address
    hub: Hub             # this process's connections
    broker: Broker       # this process's pub/sub link
    rooms: RoomService   # room operations that reach every process
    sales: Sales
    orders: Orders
    _core: _Core

    def loops(self) -> dict[str, Loop]:
        """What serves viewers: the pub/sub listener, the hub's tick, sale updates."""
        return {"broker": self.broker.run(self.hub), "hub": self.hub.run(), "notifier": self._core.notifier.run()}

    async def close(self) -> None:
        await self._core.close()


async def build_web(settings: Settings, url: str) -> Services:
    core = await _core(settings, url)
    sessions = Sessions(settings.secret_key, settings.token_ttl_s, core.redis)
    broker = Broker(Nodes(core.redis), sessions, sharded=core.publisher.sharded)  # connects when it runs
    welcomes = Welcomes(core.store, functools.partial(find_room, core.db), core.sales.in_room)
    hub = Hub(core.store, broker, core.publisher, core.banned, welcomes)
    return Services(settings=settings, redis=core.redis, db_engine=core.db_engine, db=core.db, sessions=sessions,
                    limiter=RateLimiter(core.redis), logins=LoginGuard(core.redis),
                    sockets=PerAddress(settings.max_sockets_per_address), hub=hub, broker=broker, rooms=core.rooms, sales=core.sales, orders=core.orders, _core=core)


@dataclass
class Jobs:
    """The jobs process's objects: orders to SQL, the sales' clock, payments left to capture, and
    the sale updates the sweeper's releases cause."""
    persister: Persister
    sweeper: Sweeper
    captures: LateCaptures
    watch: SaleWatch
    members: heartbeat.Members
    _core: _Core

    def loops(self) -> dict[str, Loop]:
        return {"persister": self.persister.run(), "sweeper": self.sweeper.run(), "captures": self.captures.run(),
                "notifier": self._core.notifier.run(), "wakes": self.watch.listen(), "heartbeat": self.members.run()}

    async def close(self) -> None:
        try:
            await self.members.leave()
        except REDIS_ERRORS:  # Redis away: the others take over this share after MEMBER_STALE_S
            pass
        await self._core.close()


async def build_jobs(settings: Settings, url: str) -> Jobs:
    core = await _core(settings, url)
    me = f"{socket.gethostname()}-{os.getpid()}"  # this jobs process, among the deployment's
    members = heartbeat.Members(core.redis, settings.deployment, me)
    watch = SaleWatch(core.stock, members)  # the three loops visit the sales it says, when it says
    return Jobs(persister=Persister(core.redis, core.stock, core.db, consumer=me, watch=watch),
                sweeper=Sweeper(core.stock, core.rooms, core.notifier, watch),
                captures=LateCaptures(core.stock, core.orders, watch), watch=watch, members=members, _core=core)
