"""Test helpers: a real livesale server in a subprocess, and API shortcuts."""

from __future__ import annotations

import asyncio
import hashlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from http.cookiejar import CookieJar, DefaultCookiePolicy
from pathlib import Path
from typing import Any, Awaitable, Callable

import httpx

REPO = Path(__file__).resolve().parent.parent


def stop_process(proc: subprocess.Popen[bytes] | None, sig: int, timeout: float) -> None:
    """Ask a process (started with start_new_session) to stop with `sig`; SIGKILL its group if it
    has not stopped in `timeout` seconds."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerProcess:
    """`livesale serve` on a free loopback port, stopped by the test that started it."""

    def __init__(self, data_dir: Path, *, redis_url: str | None, env: dict[str, str] | None = None,
                 workers: int = 1, port: int | None = None, secret_key: str | None = None,
                 log_level: str = "warning") -> None:
        self.data_dir = data_dir
        self.port = port or free_port()
        self.workers = workers
        self.log_level = log_level
        self.env = {
            **os.environ,
            "LIVESALE_DATA_DIR": str(data_dir),
            "LIVESALE_SECRET_KEY": secret_key or "test-secret-" + "k" * 40,
            "PYTHONUNBUFFERED": "1",
            # The whole suite comes from 127.0.0.1; per-IP limits are tested on servers that clear this.
            "LIVESALE_RATE_LIMIT_EXEMPT_IPS": "127.0.0.1",
            **(env or {}),
        }
        # Servers on one data dir are one deployment (one SQL database); the tests build
        # their own Stock for a server with this name.
        self.deployment = self.env.setdefault(
            "LIVESALE_DEPLOYMENT", "test-" + hashlib.sha256(str(data_dir.resolve()).encode()).hexdigest()[:10])
        if redis_url is not None:
            self.env["REDIS_URL"] = redis_url
        else:
            self.env.pop("REDIS_URL", None)
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = data_dir / f"server-{self.port}.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> "ServerProcess":
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "server", "serve", "--port", str(self.port), "--workers", str(self.workers),
             "--log-level", self.log_level],
            cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"server did not become healthy in {timeout}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-5000:] if self.log_path.exists() else ""

    def stop(self, timeout: float = 20.0) -> None:
        proc, self.proc = self.proc, None
        stop_process(proc, signal.SIGTERM, timeout)

    def kill(self) -> None:
        """SIGKILL the whole process group, as a crash would."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


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
