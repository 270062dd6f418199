"""The two pages (viewer room, host console), the index, static files, and the
security headers every response carries."""

from __future__ import annotations

from pathlib import Path

from starlette.responses import FileResponse
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

# Scripts and styles only from this origin (no inline code), media from anywhere a host may
# stream from, sockets back to this origin.
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: https: http:; "
       "media-src 'self' blob: https: http:; connect-src 'self'; object-src 'none'; base-uri 'none'; "
       "frame-ancestors 'none'; form-action 'self'")

SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"same-origin"),
    (b"x-frame-options", b"DENY"),
    (b"content-security-policy", CSP.encode()),
]


class SecurityHeaders:
    """Adds the headers above to every HTTP response (pure ASGI: no body buffering)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = list(message.get("headers", [])) + SECURITY_HEADERS
            await send(message)

        await self.app(scope, receive, send_with_headers)


def _whole(scope: Scope) -> Scope:
    """The request without Range headers: pages and static files are small and always sent whole
    (Starlette would answer a bad range with a plain-text 400 or 416; every error here is JSON)."""
    return {**scope, "headers": [(k, v) for k, v in scope["headers"] if k not in (b"range", b"if-range")]}


class _Page:
    def __init__(self, path: Path) -> None:
        self.path = path

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = FileResponse(self.path, media_type="text/html", headers={"Cache-Control": "no-cache"})
        await response(_whole(scope), receive, send)


class _Static:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(_whole(scope) if scope["type"] == "http" else scope, receive, send)


def routes(static_dir: Path) -> list[BaseRoute]:
    return [
        Route("/", _Page(static_dir / "index.html"), methods=["GET"]),
        Route("/rooms/{room_id}", _Page(static_dir / "room.html"), methods=["GET"]),
        Route("/console", _Page(static_dir / "console.html"), methods=["GET"]),
        Mount("/static", _Static(StaticFiles(directory=static_dir, check_dir=False)), name="static"),
    ]
