"""The application factory: wiring of settings, engines and routes."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import AsyncIterator

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route, WebSocketRoute

from server.api import accounts, health, live, openapi, pages, products, rooms, sales
from server.api.endpoint import Router
from server.api.endpoint import routes as endpoint_routes
from server.api.hosts import AllowedHosts, relative_slash_redirects
from server.api.responses import EXCEPTION_HANDLERS, json_response
from server.api.room_socket import room_socket
from server.backends import open_files, uvicorn_protocols
from server.backends.loops import stop as stop_loops
from server.backends.sql import POOL_MAX
from server.config import Settings, load_settings
from server.inventory.ledger import max_commission_bp
from server.metrics import metrics
from server.wiring import build_web, ensure_schema, redis_url

log = logging.getLogger("livesale")

HOT_ROUTES = ("purchase",)
ROUTERS: list[Router] = [health.router, accounts.router, products.router, rooms.router, live.router,
                          sales.router]


def create_app(settings: Settings | None = None) -> Starlette:
    """A web worker. Its Redis is REDIS_URL, or the embedded engine `livesale serve` started; the
    background jobs run in a process of their own (server/jobs.py)."""
    settings = settings or load_settings()
    uvicorn_protocols.configure(edge_limits(settings)[0])
    schema = openapi.build(ROUTERS, max_commission_bp=max_commission_bp(settings.platform_fee_bp))

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await ensure_schema(settings)
        services = await build_web(settings, redis_url(settings))
        app.state.services = services
        tasks = [asyncio.create_task(coro, name=name) for name, coro in services.loops().items()]
        try:
            yield
        finally:
            services.hub.shutdown()
            await asyncio.sleep(0.1)  # let writers send their close frames
            await stop_loops(tasks)
            await services.close()

    async def openapi_json(request: Request) -> Response:
        return json_response(schema)

    # Starlette tries routes in order, a regex each: the one a sale's spike hits goes first.
    api = endpoint_routes(ROUTERS)
    routes: list[BaseRoute] = [r for r in api if r.name in HOT_ROUTES]
    routes += [Route("/openapi.json", openapi_json, methods=["GET"]), Route("/metrics", metrics, methods=["GET"]),
               WebSocketRoute("/ws/rooms/{room_id}", room_socket)]
    routes += [r for r in api if r.name not in HOT_ROUTES]
    routes += pages.routes(settings.static_dir)
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers=EXCEPTION_HANDLERS,
                    middleware=[Middleware(pages.SecurityHeaders),
                                Middleware(AllowedHosts, allowed=settings.allowed_hosts)])
    relative_slash_redirects(app.router)
    return app


def edge_limits(settings: Settings) -> tuple[uvicorn_protocols.Limits, str | None]:
    """The connection caps of a web worker, fitted under its open-file limit (and the warning,
    when they had to be lowered)."""
    per_process, warning = open_files.fit_connections(settings.max_connections,
                                                      settings.redis_max_connections + POOL_MAX,
                                                      open_files.current_limit())
    return uvicorn_protocols.Limits(per_address=settings.max_connections_per_address, per_process=per_process,
                                    exempt=frozenset(settings.rate_limit_exempt_ips)), warning
