"""The tests' one vocabulary: a real livesale server in a subprocess, the Redis database indexes of
the session Valkey, an HTTP client, actors (who calls the API) and API shortcuts, waiting, and the
Redis and SQL of a running server.

Helpers of one domain live beside its tests: tests/rooms/support.py (the room socket's client),
tests/inventory/support.py (sales, orders, spikes, the in-process World), tests/reliability/support.py
(engines that fail, logs, raw frames, crafted tokens)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import secrets
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from http.cookiejar import CookieJar, DefaultCookiePolicy
from pathlib import Path
from typing import Any

import httpx
from itsdangerous import TimestampSigner, URLSafeTimedSerializer
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from load.servers import Livesale, free_port
from server.backends.embedded_valkey import EmbeddedValkey
from server.backends.redis_client import RedisClient, close, make_redis
from server.backends.sql import make_engine, make_sessionmaker
from server.inventory.stock import Stock

REPO = Path(__file__).resolve().parent.parent

PASSWORD = "correct horse battery"
TEST_SECRET_KEY = "test-secret-" + "k" * 40  # ServerProcess's key unless told
SALT = "livesale.session.v1"  # server/auth.py signs sessions with it

# Redis database indexes of the session Valkey (it has the default 16). Every test server of the
# session shares that Valkey, and a server's background jobs act on every sale in its Redis
# database (the persister acknowledges the stream entries of sales its own SQL does not know, and
# the sweeper releases their orders): so each server with a SQL database of its own, and each
# in-process test, uses an index of its own. 0 is the shared `server`'s.
DB_PACKAGED = 5     # test_packaging.py: the server installed from its wheel
DB_PG_OUTAGE = 6     # reliability/test_postgres.py: a server whose PostgreSQL goes away
DB_POSTGRES = 7      # the session's server on PostgreSQL (conftest's `pg_server`)
DB_REVOCATION = 8    # security/test_session_revocation.py (in-process)
DB_IN_PROCESS = 9    # the in-process tests (tests/inventory/support.World)
DB_WORKERS2 = 10     # inventory/test_spike.py: two workers
DB_CRASH = 11        # inventory/test_spike.py: a server killed mid-spike
DB_SPARE = 12        # inventory/test_ledger.py: a second in-process world
DB_PAIR = 13         # reliability/test_processes.py: two processes on one data dir
DB_SESSIONS = 14     # security/test_sessions.py
DB_HTTP = 15         # security/test_http.py


def redis_db_url(redis_url: str, db: int) -> str:
    """The session Valkey's URL (redis://127.0.0.1:PORT/0) pointed at another database index."""
    base, _, index = redis_url.rpartition("/")
    assert base.startswith("redis://127.0.0.1:") and index.isdigit(), redis_url
    return f"{base}/{db}"


# --- servers ---------------------------------------------------------------------------------------

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
                         secret_key=secret_key or TEST_SECRET_KEY,
                         env={"LIVESALE_DEPLOYMENT": deployment, **(env or {})})
        self.deployment = self.env["LIVESALE_DEPLOYMENT"]


def api_client(base_url: str, *, connections: int = 100, timeout: float = 60.0) -> httpx.AsyncClient:
    """A loopback HTTP client that keeps no cookies (each request carries only the credentials it is
    given) and ignores proxy settings; at most `connections` connections at once."""
    assert base_url.startswith("http://127.0.0.1:"), base_url
    jar = CookieJar(DefaultCookiePolicy(allowed_domains=[]))
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    return httpx.AsyncClient(base_url=base_url, timeout=timeout, cookies=jar, trust_env=False, limits=limits)


# --- actors and API shortcuts ----------------------------------------------------------------------

def unique(prefix: str) -> str:
    return f"{prefix}{secrets.token_hex(4)}"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@dataclass(frozen=True)
class Actor:
    """Someone with a session, as /api/auth/register or /api/auth/guest answered."""
    user_id: str
    token: str
    name: str
    role: str
    username: str

    @property
    def auth(self) -> dict[str, str]:
        return bearer(self.token)

    @classmethod
    def of(cls, body: dict[str, Any]) -> Actor:
        return cls(body["user_id"], body["token"], body["name"], body["role"], body["username"])


async def register(client: httpx.AsyncClient, role: str = "host", username: str | None = None,
                   password: str = PASSWORD) -> Actor:
    r = await client.post("/api/auth/register",
                          json={"username": username or unique(role), "password": password, "role": role})
    assert r.status_code == 201, r.text
    return Actor.of(r.json())


async def guest(client: httpx.AsyncClient, name: str = "viewer") -> Actor:
    r = await client.post("/api/auth/guest", json={"name": name})
    assert r.status_code == 201, r.text
    return Actor.of(r.json())


async def guests(client: httpx.AsyncClient, n: int, name: str = "g", concurrency: int = 32) -> list[Actor]:
    """`n` guests named name0, name1, ... (at most `concurrency` sign-ups at once)."""
    sem = asyncio.Semaphore(concurrency)

    async def one(i: int) -> Actor:
        async with sem:
            return await guest(client, f"{name}{i}")

    return list(await asyncio.gather(*(one(i) for i in range(n))))


async def create_product(client: httpx.AsyncClient, host: Actor, **fields: Any) -> dict[str, Any]:
    body = {"name": "Tea", "price_cents": 1999, "commission_rate_bp": 2000, **fields}
    r = await client.post("/api/products", json=body, headers=host.auth)
    assert r.status_code == 201, r.text
    return dict(r.json())


async def create_room(client: httpx.AsyncClient, host: Actor, **fields: Any) -> dict[str, Any]:
    r = await client.post("/api/rooms", json={"title": "Live", **fields}, headers=host.auth)
    assert r.status_code == 201, r.text
    return dict(r.json())


def craft_token(secret: str, payload: dict[str, Any], age_s: float = 0) -> str:
    """A session token as a server with `secret` would sign it, `age_s` seconds old."""
    class Signer(TimestampSigner):
        def get_timestamp(self) -> int:
            return int(time.time() - age_s)

    return str(URLSafeTimedSerializer(secret, salt=SALT, signer=Signer).dumps(payload))


def payload_of(user: Actor, session: str | None = None) -> dict[str, Any]:
    """What a session token of `user` carries (a new session id unless given)."""
    return {"u": user.user_id, "s": session or secrets.token_urlsafe(12), "r": user.role, "n": user.name}


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


# --- waiting ---------------------------------------------------------------------------------------

async def eventually(check: Callable[[], Awaitable[Any]], *, timeout: float = 10.0, interval: float = 0.1,
                     what: str = "condition") -> Any:
    """Poll `check` until it returns something truthy (returned); at most `timeout` seconds. A guard
    against hanging: never an assertion about speed."""
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


# --- the Redis and SQL of a server -----------------------------------------------------------------

@contextmanager
def valkey(data_dir: Path) -> Iterator[str]:
    """A real Valkey of its own on a free loopback port (its URL), stopped on exit."""
    engine = EmbeddedValkey(data_dir, port=free_port())
    url = engine.start()
    try:
        yield url
    finally:
        engine.stop()


@asynccontextmanager
async def open_redis(url: str, connections: int = 8) -> AsyncIterator[RedisClient]:
    """A client of a Redis that closes its pool's connections on exit (a client made with an explicit
    pool, as make_redis does, leaves them to the garbage collector otherwise, which
    filterwarnings=error turns into a ResourceWarning failure of whatever test is running then)."""
    redis = make_redis(url, connections)
    try:
        yield redis
    finally:
        await close(redis)


@asynccontextmanager
async def open_sql(where: Path | str) -> AsyncIterator[async_sessionmaker[AsyncSession]]:
    """A SQLite file by its path, or any database by its SQLAlchemy URL."""
    engine = make_engine(where if isinstance(where, str) else f"sqlite+aiosqlite:///{where}")
    try:
        yield make_sessionmaker(engine)
    finally:
        await engine.dispose()


def server_db_url(srv: ServerProcess) -> str:
    return srv.env.get("DATABASE_URL") or f"sqlite+aiosqlite:///{srv.data_dir / 'livesale.db'}"


@asynccontextmanager
async def backends(srv: ServerProcess) -> AsyncIterator[tuple[Stock, async_sessionmaker[AsyncSession]]]:
    """The Redis (as the server's `Stock`) and the SQL database a running test server uses, for
    checks from the test."""
    async with open_redis(srv.env["REDIS_URL"]) as redis, open_sql(server_db_url(srv)) as db:
        stock = Stock(redis, srv.deployment)
        try:
            yield stock, db
        finally:
            stock.disconnect()


# --- processes -------------------------------------------------------------------------------------

def server_holds(pid: int, server_port: int, client: socket.socket) -> bool:
    """Whether process `pid` has a descriptor on the server side of `client`'s TCP connection."""
    client_port = client.getsockname()[1]
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote = fields[1], fields[2]
        if int(local.split(":")[1], 16) == server_port and int(remote.split(":")[1], 16) == client_port:
            inodes.add(fields[9])
    fds = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            fds.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            continue
    return any(f"socket:[{inode}]" in fds for inode in inodes)
