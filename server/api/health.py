"""GET /healthz: 200 when Redis and the database answer and room events flow, 503 otherwise."""

from __future__ import annotations

import asyncio
from typing import Literal

from starlette.responses import Response

from server.api.endpoint import Call, Router
from server.api.responses import json_response
from server.backends.sql import ping
from server.schemas import Health

router = Router("health")
TIMEOUT_S = 2.0


async def _check(coro: object) -> str:
    try:
        await asyncio.wait_for(coro, TIMEOUT_S)  # type: ignore[arg-type]
        return "ok"
    except Exception as exc:  # any failure means "not healthy"; say which
        return f"error: {type(exc).__name__}"


@router.endpoint("GET", "/healthz", response=Health, also_ok=(503,))
async def healthz(call: Call[None]) -> Response:
    """Readiness: both backends answer, and this process's pub/sub link is up (without it,
    viewers who join wait for it and the room's events do not reach them)."""
    redis_state, db_state = await asyncio.gather(_check(call.services.redis.ping()),
                                                 _check(ping(call.services.db_engine)))
    pubsub_state: Literal["ok", "down"] = "ok" if call.services.broker.is_connected() else "down"
    ok = redis_state == db_state == pubsub_state == "ok"
    return json_response(Health(status="ok" if ok else "unavailable", redis=redis_state, database=db_state,
                                pubsub=pubsub_state), 200 if ok else 503)
