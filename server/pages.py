"""The two pages (viewer room, host console), the index, static files, and the
security headers every response carries."""

from __future__ import annotations

from pathlib import Path
from typing import Awaitable, Callable

from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

# Scripts and styles only from this origin (no inline code), media from anywhere a host may
# stream from, sockets back to this origin.
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: https: http:; "
       "media-src 'self' blob: https: http:; connect-src 'self'; object-src 'none'; base-uri 'none'; "
       "frame-ancestors 'none'; form-action 'self'")

_HEADERS = [
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
                message["headers"] = list(message.get("headers", [])) + _HEADERS
            await send(message)

        await self.app(scope, receive, send_with_headers)


def routes(static_dir: Path) -> list[BaseRoute]:
    def page(name: str) -> Callable[[Request], Awaitable[Response]]:
        async def serve(request: Request) -> Response:
            return FileResponse(static_dir / name, media_type="text/html", headers={"Cache-Control": "no-cache"})
        return serve

    return [
        Route("/", page("index.html"), methods=["GET"]),
        Route("/rooms/{room_id}", page("room.html"), methods=["GET"]),
        Route("/console", page("console.html"), methods=["GET"]),
        Mount("/static", StaticFiles(directory=static_dir, check_dir=False), name="static"),
    ]
