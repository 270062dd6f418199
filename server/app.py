"""The application factory: wiring of settings, engines and routes."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import AsyncIterator

from sqlalchemy.exc import OperationalError
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route, WebSocketRoute

from server import pages
from server.api import accounts, health, live, openapi, products, rooms, sales
from server.api.endpoint import Router, routes as endpoint_routes
from server.api.responses import EXCEPTION_HANDLERS, json_response
from server.config import Settings, load_settings
from server.db import create_schema, make_engine
from server.embedded_redis import EmbeddedRedis
from server.loops import stop as stop_loops
from server.metrics import metrics
from server.rooms.connection import room_socket
from server.wiring import wire

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
        await ensure_schema(settings)
        wired = await wire(settings, redis_url)
        app.state.services = wired.services
        jobs = wired.room_loops()
        if settings.background_jobs:  # `livesale serve` runs them in a process of their own instead
            jobs.update(wired.background_jobs())
        tasks = [asyncio.create_task(coro, name=name) for name, coro in jobs.items()]
        try:
            yield
        finally:
            wired.services.hub.shutdown()
            await asyncio.sleep(0.1)  # let writers send their close frames
            await stop_loops(tasks)
            await wired.close()
            if embedded is not None:
                embedded.stop()

    async def openapi_json(request: Request) -> Response:
        return json_response(schema)

    # Starlette tries routes in order, a regex each: the one a sale's spike hits goes first.
    api = endpoint_routes(ROUTERS)
    routes: list[BaseRoute] = [r for r in api if r.name in HOT_ROUTES]
    routes += [Route("/openapi.json", openapi_json, methods=["GET"]), Route("/metrics", metrics, methods=["GET"]),
               WebSocketRoute("/ws/rooms/{room_id}", room_socket)]
    routes += [r for r in api if r.name not in HOT_ROUTES]
    routes += pages.routes(settings.static_dir)
    return Starlette(routes=routes, lifespan=lifespan, exception_handlers=EXCEPTION_HANDLERS,
                     middleware=[Middleware(pages.SecurityHeaders)])
