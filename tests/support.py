"""Test helpers: a real livesale server in a subprocess, and API shortcuts."""

from __future__ import annotations

import asyncio
import hashlib
import secrets
from http.cookiejar import CookieJar, DefaultCookiePolicy
from pathlib import Path
from typing import Any, Awaitable, Callable

import httpx

from load.servers import Livesale

REPO = Path(__file__).resolve().parent.parent


class ServerProcess(Livesale):
    """`livesale serve` (load.servers.Livesale) with the tests' defaults, stopped by the test that
    started it: a fixed secret key unless told, the Redis it is given (None: its embedded engine),
    and a deployment name of its data dir's own. The whole suite comes from 127.0.0.1, which
    Livesale exempts from per-IP limits; those are tested on servers whose `env` clears
    LIVESALE_RATE_LIMIT_EXEMPT_IPS."""

    def __init__(self, data_dir: Path, *, redis_url: str | None, env: dict[str, str] | None = None,
                 workers: int = 1, port: int | None = None, secret_key: str | None = None,
                 log_level: str = "warning") -> None:
        # Servers on one data dir are one deployment (one SQL database); the tests build
        # their own Stock for a server with this name.
        deployment = "test-" + hashlib.sha256(str(data_dir.resolve()).encode()).hexdigest()[:10]
        super().__init__(data_dir, redis_url=redis_url, workers=workers, port=port, log_level=log_level,
                         secret_key=secret_key or "test-secret-" + "k" * 40,
                         env={"LIVESALE_DEPLOYMENT": deployment, **(env or {})})
        self.deployment = self.env["LIVESALE_DEPLOYMENT"]


def unique(prefix: str) -> str:
    return f"{prefix}{secrets.token_hex(4)}"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def register(client: httpx.AsyncClient, role: str = "host", username: str | None = None,
                   password: str = "correct horse battery") -> dict[str, Any]:
    r = await client.post("/api/auth/register",
                          json={"username": username or unique(role), "password": password, "role": role})
    assert r.status_code == 201, r.text
    return dict(r.json())


async def guest(client: httpx.AsyncClient, name: str = "viewer") -> dict[str, Any]:
    r = await client.post("/api/auth/guest", json={"name": name})
    assert r.status_code == 201, r.text
    return dict(r.json())


async def create_product(client: httpx.AsyncClient, token: str, **fields: Any) -> dict[str, Any]:
    body = {"name": "Tea", "price_cents": 1999, "commission_rate_bp": 2000, **fields}
    r = await client.post("/api/products", json=body, headers=bearer(token))
    assert r.status_code == 201, r.text
    return dict(r.json())


async def create_room(client: httpx.AsyncClient, token: str, **fields: Any) -> dict[str, Any]:
    r = await client.post("/api/rooms", json={"title": "Live", **fields}, headers=bearer(token))
    assert r.status_code == 201, r.text
    return dict(r.json())


def assert_error(r: httpx.Response, status: int, code: str | None = None, field: str | None = None) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    body: dict[str, Any] = r.json()
    assert set(body) <= {"error", "message", "field"}
    assert isinstance(body["error"], str) and body["error"]
    assert isinstance(body["message"], str) and body["message"]
    if code is not None:
        assert body["error"] == code, body
    if field is not None:
        assert body.get("field") == field, body
    return body


def cookieless_client(url: str) -> httpx.AsyncClient:
    """A client that never stores cookies: each request carries only what the test gives it."""
    return httpx.AsyncClient(base_url=url, timeout=30, cookies=CookieJar(DefaultCookiePolicy(allowed_domains=[])))


async def eventually(check: Callable[[], Awaitable[Any]], *, timeout: float = 10.0, interval: float = 0.1,
                     what: str = "condition") -> Any:
    """Poll `check` until it returns something truthy (returned); at most `timeout` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last: Any = None
    while True:
        last = await check()
        if last:
            return last
        if loop.time() >= deadline:
            raise AssertionError(f"{what} not reached within {timeout}s (last: {last!r})")
        await asyncio.sleep(interval)
