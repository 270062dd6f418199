"""The application factory: wiring of settings, engines and routes."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any, AsyncIterator

from sqlalchemy.exc import OperationalError
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route, WebSocketRoute

from server import pages
from server.api import accounts, health, live, openapi, products, rooms, sales
from server.api.endpoint import Router
from server.api.responses import EXCEPTION_HANDLERS, json_response
from server.auth import Sessions
from server.catalog import describe_room, get_room
from server.config import Settings, load_settings
from server.db import create_schema, make_engine, make_sessionmaker
from server.embedded_redis import EmbeddedRedis
from server.errors import NotFound
from server.inventory.notifier import SaleNotifier
from server.inventory.payments import SimulatedPayments
from server.inventory.persister import Persister
from server.inventory.sales import SaleService
from server.inventory.stock import Stock
from server.inventory.sweeper import Sweeper
from server.loops import stop as stop_loops
from server.metrics import metrics
from server.ratelimit import RateLimiter
from server.redis_pool import make_listener, make_redis
from server.rooms.broker import Broker
from server.rooms.connection import room_socket
from server.rooms.hub import Hub
from server.rooms.service import RoomService, room_meta
from server.rooms.store import RoomStore
from server.services import Services

log = logging.getLogger("livesale")

HOT_ROUTES = ("purchase",)
ROUTERS: list[Router] = [health.router, accounts.router, products.router, rooms.router, live.router,
                          sales.router]


async def ensure_schema(settings: Settings) -> None:
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


def create_app(settings: Settings | None = None) -> Starlette:
    settings = settings or load_settings()
    schema = openapi.build(ROUTERS)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        embedded: EmbeddedRedis | None = None
        redis_url = settings.redis_url
        if redis_url is None:
            embedded = EmbeddedRedis(settings.data_dir, binary=settings.redis_server_bin)
            redis_url = embedded.start(supervise=True)
            log.info("started embedded Valkey at %s", redis_url)
        redis = make_redis(redis_url, settings.redis_max_connections)
        await ensure_schema(settings)
        engine = make_engine(settings.database_url)
        db = make_sessionmaker(engine)

        async def load_meta(room_id: str) -> dict[str, Any] | None:
            async with db() as session:
                try:
                    return room_meta(await describe_room(session, await get_room(session, room_id)))
                except NotFound:
                    return None

        hub: Hub
        listener = make_listener(redis_url)
        sessions = Sessions(settings.secret_key, settings.token_ttl_s, redis)
        broker = Broker(redis, listener, lambda room_id, data: hub.on_message(room_id, data), lambda: hub.resync(),
                        lambda session_id: hub.end_session(session_id), sessions)
        store = RoomStore(redis, broker)
        hub = Hub(store, broker, load_meta)
        await broker.detect()
        rooms = RoomService(store, broker)
        stock = Stock(redis, settings.deployment)
        notifier = SaleNotifier(redis, rooms)
        sales = SaleService(settings, stock, db, rooms, SimulatedPayments(), notifier)
        hub.load_sale = sales.snapshot
        app.state.services = Services(
            settings=settings, redis=redis, db_engine=engine, db=db,
            sessions=sessions,
            limiter=RateLimiter(redis), hub=hub, rooms=rooms, sales=sales,
        )
        jobs = {"broker": broker.run(), "hub": hub.run(), "notifier": notifier.run()}
        if settings.background_jobs:
            jobs["persister"] = Persister(redis, stock, db).run()
            jobs["sweeper"] = Sweeper(stock, sales, notifier).run()
        tasks = [asyncio.create_task(coro, name=name) for name, coro in jobs.items()]
        try:
            yield
        finally:
            hub.shutdown()
            await asyncio.sleep(0.1)  # let writers send their close frames
            await stop_loops(tasks)
            await listener.aclose(close_connection_pool=True)
            await redis.aclose(close_connection_pool=True)
            await engine.dispose()
            if embedded is not None:
                embedded.stop()

    async def openapi_json(request: Request) -> Response:
        return json_response(schema)

    # Starlette tries routes in order, a regex each: the one a sale's spike hits goes first.
    api = [route for router in ROUTERS for route in router.routes()]
    routes: list[BaseRoute] = [r for r in api if r.name in HOT_ROUTES]
    routes += [Route("/openapi.json", openapi_json, methods=["GET"]), Route("/metrics", metrics, methods=["GET"]),
               WebSocketRoute("/ws/rooms/{room_id}", room_socket)]
    routes += [r for r in api if r.name not in HOT_ROUTES]
    routes += pages.routes(settings.static_dir)
    return Starlette(routes=routes, lifespan=lifespan, exception_handlers=EXCEPTION_HANDLERS,
                     middleware=[Middleware(pages.SecurityHeaders)])
