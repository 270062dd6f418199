"""Declaring endpoints: authentication, body decoding and the OpenAPI entry in one place.

Each resource module makes a `Router` and decorates its handlers:

    @router.endpoint("POST", "/api/products", auth="host", body=ProductIn,
                     response=ProductOut, status=201, errors=(404,))
    async def create_product(call: Call[ProductIn]) -> ProductOut: ...

The decorator authenticates (and refuses viewers on host routes), checks
CSRF for cookie sessions, decodes and validates the JSON body against its
msgspec type (400 malformed, 422 naming the field), and encodes the result.
The same declarations generate /openapi.json, so the schema cannot drift.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Generic, Literal, TypeVar

import msgspec
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from server.api.responses import json_response
from server.auth import Principal, authenticate, check_csrf
from server.errors import BadRequest, Forbidden, PayloadTooLarge, Unauthorized, Unprocessable, UnsupportedMediaType
from server.wiring import Services

B = TypeVar("B")
Auth = Literal["none", "optional", "user", "host"]
MAX_BODY_BYTES = 64 * 1024

_FIELD_AT = re.compile(r"at `\$\.?([^`]*)`")
_FIELD_NAMED = re.compile(r"field `([^`]+)`")


@dataclass
class Call(Generic[B]):
    request: Request
    services: Services
    user: Principal | None
    body: B

    @property
    def me(self) -> Principal:
        # Only reached on routes declared auth="user"/"host", where the decorator
        # has already refused anonymous callers.
        if self.user is None:
            raise Unauthorized("log in first")
        return self.user

    def param(self, name: str) -> str:
        return str(self.request.path_params[name])


Handler = Callable[[Call[Any]], Awaitable[Any]]


@dataclass(frozen=True)
class Spec:
    method: str
    path: str
    name: str
    summary: str
    auth: Auth
    body: Any
    response: Any
    status: int
    errors: tuple[int, ...]
    query: tuple[tuple[str, str, dict[str, Any]], ...] = ()  # (name, description, JSON schema)
    also_ok: tuple[int, ...] = ()  # other statuses with the same body (a replayed purchase: 200; /healthz: 503)
    headers: tuple[tuple[str, str, dict[str, Any]], ...] = ()  # required request headers: name, description, schema


@dataclass
class Router:
    tag: str
    specs: list[tuple[Spec, Handler]] = field(default_factory=list)

    def endpoint(self, method: str, path: str, *, auth: Auth = "none", body: Any = None,
                 response: Any = None, status: int = 200, errors: tuple[int, ...] = (),
                 query: tuple[tuple[str, str, dict[str, Any]], ...] = (), also_ok: tuple[int, ...] = (),
                 headers: tuple[tuple[str, str, dict[str, Any]], ...] = ()) -> Callable[[Handler], Handler]:
        def register(fn: Handler) -> Handler:
            summary = (fn.__doc__ or fn.__name__).strip().splitlines()[0]
            self.specs.append((Spec(method, path, fn.__name__, summary, auth, body, response, status,
                                    errors, query, also_ok, headers), fn))
            return fn
        return register


def routes(routers: list[Router]) -> list[Route]:
    """One route per path, whatever the routers that declare its methods: a method the path does
    not serve then gets a 405 whose `Allow` lists every method it does (a route per method and
    path answered with the first route's)."""
    by_path: dict[str, dict[str, _Endpoint]] = {}
    for router in routers:
        for spec, fn in router.specs:
            by_path.setdefault(spec.path, {})[spec.method] = _Endpoint(spec, fn)
    return [Route(path, _Methods(endpoints), methods=list(endpoints),
                  name="+".join(e.spec.name for e in endpoints.values()))
            for path, endpoints in by_path.items()]


def field_of(message: str) -> str | None:
    m = _FIELD_AT.search(message) or _FIELD_NAMED.search(message)
    return m.group(1) if m else None


async def read_body(request: Request, body_type: Any) -> Any:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise PayloadTooLarge(f"body over {MAX_BODY_BYTES} bytes")
    # Straight from the ASGI channel (Request.stream's async generator costs more than the
    # small bodies it reads); the body is read once, only here.
    chunks: list[bytes] = []
    size = 0
    more = True
    while more:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        chunk = message.get("body", b"")
        more = message.get("more_body", False)
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise PayloadTooLarge(f"body over {MAX_BODY_BYTES} bytes")
        chunks.append(chunk)
    raw = chunks[0] if len(chunks) == 1 else b"".join(chunks)
    if not raw.strip():
        raw = b"{}"  # an empty body means "all defaults"; required fields still fail below
    else:
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype != "application/json":
            raise UnsupportedMediaType("send the body as JSON with Content-Type: application/json")
    try:
        return msgspec.json.decode(raw, type=body_type)
    except msgspec.ValidationError as exc:
        msg = str(exc)
        if "Expected `int`, got `float`" in msg:  # 25.0 is an integer to JSON Schema, and so to us
            try:
                return msgspec.convert(_integral(msgspec.json.decode(raw)), body_type)
            except msgspec.ValidationError as again:
                msg = str(again)
        raise Unprocessable(msg, field=field_of(msg)) from None
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise BadRequest(f"malformed JSON: {exc}", code="malformed_json") from None


def _integral(value: Any) -> Any:
    """A decoded body with its whole-number floats (25.0) as ints, within int64."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**63:
        return int(value)
    if isinstance(value, dict):
        return {k: _integral(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_integral(v) for v in value]
    return value


class _Methods:
    """A path's endpoints by method (the route has refused the others; HEAD is GET's)."""

    def __init__(self, endpoints: dict[str, _Endpoint]) -> None:
        self.endpoints = endpoints
        if "GET" in endpoints:
            self.endpoints = {**endpoints, "HEAD": endpoints["GET"]}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.endpoints[scope["method"]](scope, receive, send)


class _Endpoint:
    """One declared endpoint as a plain ASGI app. Starlette runs a class instance as it is,
    without wrapping each request in its function-endpoint layers; errors still reach the
    app's exception handlers, through its ExceptionMiddleware."""

    def __init__(self, spec: Spec, fn: Handler) -> None:
        self.spec = spec
        self.fn = fn
        self.__name__ = spec.name

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        spec = self.spec
        request = Request(scope, receive)
        services: Services = scope["app"].state.services
        user: Principal | None = None
        if spec.auth != "none":
            user = await authenticate(services.sessions, request.headers, request.cookies)
            if user is None and spec.auth in ("user", "host"):
                raise Unauthorized("log in first")
            if spec.auth == "host" and user is not None and not user.is_host:
                raise Forbidden("only hosts can do this", code="host_only")
            check_csrf(user, request.method, request.headers, scope["scheme"], services.settings.allowed_origins)
        body = await read_body(request, spec.body) if spec.body is not None else None
        result = await self.fn(Call(request, services, user, body))
        if not isinstance(result, Response):
            status, content = result if isinstance(result, tuple) else (spec.status, result)
            result = json_response(content, status)
        await result(scope, receive, send)
