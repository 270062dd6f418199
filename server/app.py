"""The application factory: wiring of settings, engines and routes."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import AsyncIterator

from sqlalchemy.exc import OperationalError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from server.api import accounts, health, openapi, products, rooms
from server.api.endpoint import Router
from server.api.responses import EXCEPTION_HANDLERS, json_response
from server.auth import Sessions
from server.config import Settings, load_settings
from server.db import create_schema, make_engine, make_sessionmaker
from server.embedded_redis import EmbeddedRedis
from server.redis_pool import make_redis
from server.services import Services

log = logging.getLogger("livesale")

ROUTERS: list[Router] = [health.router, accounts.router, products.router, rooms.router]


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
            redis_url = embedded.start()
            log.info("started embedded Valkey at %s", redis_url)
        redis = make_redis(redis_url, settings.redis_max_connections)
        await ensure_schema(settings)
        engine = make_engine(settings.database_url)
        app.state.services = Services(
            settings=settings, redis=redis, db_engine=engine, db=make_sessionmaker(engine),
            sessions=Sessions(settings.secret_key, settings.token_ttl_s, redis),
        )
        try:
            yield
        finally:
            await redis.aclose()
            await engine.dispose()
            if embedded is not None:
                embedded.stop()

    async def openapi_json(request: Request) -> Response:
        return json_response(schema)

    routes: list[BaseRoute] = [Route("/openapi.json", openapi_json, methods=["GET"])]
    for router in ROUTERS:
        routes.extend(router.routes())
    return Starlette(routes=routes, lifespan=lifespan, exception_handlers=EXCEPTION_HANDLERS)
