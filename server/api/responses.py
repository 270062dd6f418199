"""JSON responses, and the one place that turns errors into HTTP answers."""

from __future__ import annotations

import logging
from typing import Any

import msgspec
from redis.exceptions import AskError, ClusterError, RedisClusterException, TryAgainError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from sqlalchemy.exc import DataError, DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as SATimeoutError
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from server.api.pages import SECURITY_HEADERS
from server.errors import ApiError

log = logging.getLogger("livesale.api")

_STATUS_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
                 405: "method_not_allowed", 409: "conflict", 413: "too_large", 415: "unsupported_media_type",
                 422: "invalid", 429: "rate_limited", 503: "unavailable"}


def json_response(content: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(msgspec.json.encode(content), status_code=status, headers=headers,
                    media_type="application/json")


def error_response(status: int, code: str, message: str, *, field: str | None = None,
                   headers: dict[str, str] | None = None) -> Response:
    body: dict[str, str] = {"error": code, "message": message}
    if field is not None:
        body["field"] = field
    return json_response(body, status, headers)


async def on_api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return error_response(exc.status, exc.code, exc.message, field=exc.field, headers=exc.headers)


async def on_http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = _STATUS_CODES.get(exc.status_code, "error")
    message = exc.detail if isinstance(exc.detail, str) else code
    return error_response(exc.status_code, code, message, headers=dict(exc.headers or {}))


async def on_unavailable(request: Request, exc: Exception) -> Response:
    # Redis or the database is down or too slow: say so at once, never hang.
    if "No connection available" in str(exc):
        # Every pooled Redis connection stayed busy for POOL_WAIT_S: overload, not an outage.
        log.warning("overloaded: no free Redis connection for %s", request.url.path)
        return error_response(503, "busy", "too busy right now; retry in a moment", headers={"Retry-After": "1"})
    log.warning("backend unavailable on %s: %r", request.url.path, exc)
    return error_response(503, "unavailable", "a backend service is unavailable, try again shortly",
                          headers={"Retry-After": "1"})


# PostgreSQL's SQLSTATEs for "cannot serve now, try again", not "this request is wrong": class 08
# (connection; server/backends/sql.py raises 08001 for a server it cannot reach), 40 (a deadlock or a
# serialization failure rolled the transaction back), 53 (insufficient resources: too many
# connections), 55P03 (lock timeout), 57014 (statement timeout), 57P01 to 57P03 (shutting down,
# crashed, starting up).
UNAVAILABLE_SQLSTATES = ("08", "40", "53", "55P03", "57014", "57P01", "57P02", "57P03")


async def on_database_error(request: Request, exc: Exception) -> Response:
    # The driver's errors that SQLAlchemy leaves generic (asyncpg's are all DBAPIError): 503 when
    # the database is away or the connection was found gone mid-request, 422 for a value it cannot
    # hold (class 22: data exception); anything else is a bug, for the 500 handler outside.
    state = str(getattr(getattr(exc, "orig", None), "sqlstate", None) or "")
    if (isinstance(exc, DBAPIError) and exc.connection_invalidated) or state.startswith(UNAVAILABLE_SQLSTATES):
        return await on_unavailable(request, exc)
    if state.startswith("22"):
        return await on_data_error(request, exc)
    raise exc


async def on_data_error(request: Request, exc: Exception) -> Response:
    # A value the database cannot hold or compare (PostgreSQL: a NUL in text, a number out of its
    # range) that validation let through: the request's fault, and nothing was written.
    log.warning("database refused a value on %s: %s", request.url.path, type(exc.__cause__ or exc).__name__)
    return error_response(422, "invalid", "a value in this request cannot be stored")


async def on_client_gone(request: Request, exc: Exception) -> Response:
    # The client hung up while sending its body: nobody will read this answer.
    return error_response(400, "client_disconnected", "the client went away")


async def on_unexpected(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s", request.url.path)
    # Answered by Starlette's outermost middleware, outside SecurityHeaders: add them here.
    return error_response(500, "internal", "internal server error",
                          headers={k.decode(): v.decode() for k, v in SECURITY_HEADERS})


EXCEPTION_HANDLERS: dict[Any, Any] = {
    ApiError: on_api_error,
    ClientDisconnect: on_client_gone,
    HTTPException: on_http_exception,
    RedisConnectionError: on_unavailable,
    RedisTimeoutError: on_unavailable,
    # A cluster that is resharding or failing over, after the client's own retries: no node
    # serves the slot, the slot is half-moved (TRYAGAIN), or it keeps moving.
    RedisClusterException: on_unavailable,
    ClusterError: on_unavailable,
    TryAgainError: on_unavailable,
    AskError: on_unavailable,
    SATimeoutError: on_unavailable,
    OperationalError: on_unavailable,
    DataError: on_data_error,
    InterfaceError: on_unavailable,
    DBAPIError: on_database_error,
    Exception: on_unexpected,
}
