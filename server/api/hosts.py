"""The Host header: refused unless allowed (LIVESALE_ALLOWED_HOSTS, against DNS rebinding), and
never echoed: a path that differs from a route by a trailing slash is redirected to the route
by a relative Location, where Starlette's own redirect writes the Host it was sent."""

from __future__ import annotations

from starlette.datastructures import Headers
from starlette.responses import RedirectResponse
from starlette.routing import Match, Router
from starlette.types import ASGIApp, Receive, Scope, Send

from server.api.responses import error_response


def host_of(value: str) -> str:
    """`Host` without its port, lower-cased (an IPv6 literal keeps its brackets)."""
    value = value.strip().lower()
    if value.startswith("["):
        return value.split("]", 1)[0] + "]"
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


class AllowedHosts:
    """400 `bad_host` (a socket: refused before its handshake) for a Host not in `allowed`;
    an empty `allowed` lets any through."""

    def __init__(self, app: ASGIApp, allowed: tuple[str, ...]) -> None:
        self.app = app
        self.allowed = frozenset(host_of(h) for h in allowed)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not self.allowed or scope["type"] not in ("http", "websocket") or \
                host_of(Headers(scope=scope).get("host", "")) in self.allowed:
            await self.app(scope, receive, send)
        elif scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
        else:
            await error_response(400, "bad_host", "this server does not answer for that host")(scope, receive, send)


def relative_slash_redirects(router: Router) -> None:
    """Replace the router's slash redirect (absolute, from the Host header) with a relative one."""
    router.redirect_slashes = False
    fallback = router.default

    async def not_found(scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope.get("path", "")
        other = path[:-1] if path.endswith("/") else path + "/"
        # Never "//host..." (a Location a browser would take as another site's).
        if scope["type"] == "http" and path not in ("", "/") and not other.startswith(("//", "/\\")):
            twin = {**scope, "path": other}
            if any(route.matches(twin)[0] is not Match.NONE for route in router.routes):
                query = scope.get("query_string", b"").decode("latin-1")
                await RedirectResponse(other + (f"?{query}" if query else ""), 307)(scope, receive, send)
                return
        await fallback(scope, receive, send)

    router.default = not_found
