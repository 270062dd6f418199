"""GET /healthz: 200 when Redis and the database answer, room events flow and a jobs process
beats, 503 otherwise."""

from __future__ import annotations

import asyncio
from typing import Literal

from starlette.responses import Response

from server import heartbeat
from server.api.endpoint import Call, Router
from server.api.responses import json_response
from server.backends import redis_client
from server.backends.redis_client import RedisClient
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
    """Readiness: both backends answer (Redis: a server's PING, a cluster's every slot served),
    this process's pub/sub link is up (without it, viewers who join wait for it and the room's
    events do not reach them), and some jobs process of the deployment beat within
    heartbeat.STALE_S (without one, unpaid orders never expire and orders never reach SQL)."""
    services = call.services
    redis_state, db_state, jobs_up = await asyncio.gather(
        _check(redis_client.ping(services.redis)), _check(ping(services.db_engine)),
        _check(_jobs_alive(services.redis, services.settings.deployment)))
    pubsub_state: Literal["ok", "down"] = "ok" if services.broker.is_connected() else "down"
    jobs_state: Literal["ok", "down"] = "ok" if jobs_up == "ok" else "down"
    ok = redis_state == db_state == pubsub_state == jobs_state == "ok"
    return json_response(Health(status="ok" if ok else "unavailable", redis=redis_state, database=db_state,
                                pubsub=pubsub_state, jobs=jobs_state), 200 if ok else 503)


async def _jobs_alive(redis: RedisClient, deployment: str) -> None:
    if not await heartbeat.alive(redis, deployment):
        raise LookupError("no jobs process beat lately")
