"""The SQL engine and session factory (SQLite by default, PostgreSQL by URL)."""

from __future__ import annotations

import contextlib
import os
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import DateTime, String, event, make_url, text
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase
from sqlalchemy.types import TypeDecorator


class UTCDateTime(TypeDecorator[datetime]):
    """Stores UTC, always returns an aware datetime (SQLite drops the zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        value = value.astimezone(timezone.utc)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


class Base(DeclarativeBase):
    """Every table's base; server.wiring.ensure_schema creates them all."""


ID = String(40)  # an opaque id: a short prefix and 26 base32 characters (server/ids.py)


CONNECT_TIMEOUT_S = 10.0
POOL_MAX = 20  # SQL connections a process may open (pool and overflow)
LIBPQ_OPTIONS = {"sslmode": "ssl", "connect_timeout": "timeout"}  # libpq's name -> asyncpg's


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    # WAL lets readers run beside the persister's writes; busy_timeout makes the
    # workers of one server queue for the write lock instead of failing.
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA busy_timeout=10000")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def make_engine(url: str) -> AsyncEngine:
    if url.startswith("sqlite"):
        _create_private(make_url(url).database)
        engine = create_async_engine(url, pool_size=POOL_MAX // 4, max_overflow=POOL_MAX // 4, pool_timeout=30)
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        return engine
    engine = create_async_engine(url, pool_size=POOL_MAX // 2, max_overflow=POOL_MAX // 2, pool_pre_ping=True,
                                 pool_timeout=30)
    if make_url(url).get_driver_name() == "asyncpg":
        event.listen(engine.sync_engine, "do_connect", _use_asyncpg_connect)
    return engine


def _create_private(path: str | None) -> None:
    """Create a new SQLite database file readable by its owner only (it holds the password hashes,
    the orders and the ledger; SQLite would create it under the umask, usually 0644). Its -wal
    and -shm files take the database file's mode."""
    if path and path != ":memory:" and not path.startswith("file:"):
        with contextlib.suppress(OSError):  # there already; or SQLite will say why it cannot open it
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))


def _use_asyncpg_connect(dialect: Dialect, record: Any, cargs: list[Any], cparams: dict[str, Any]) -> None:
    # SQLAlchemy's asyncpg adapter calls `async_creator_fn` with the connect arguments left once it
    # has taken its own (prepared_statement_cache_size, ...): the wrapper below sees only asyncpg's.
    cparams["async_creator_fn"] = _asyncpg_connect


async def _asyncpg_connect(*args: Any, **params: Any) -> Any:
    """asyncpg's connect, bounded in time (asyncpg waits 60 s by default; libpq's 0, "forever", is
    bounded too), taking libpq's usual URL options (sslmode, connect_timeout, application_name), and
    raising PostgreSQL's "cannot connect" (SQLSTATE 08001) where asyncpg raises the socket's own
    error (refused, unreachable, unresolvable, no answer in time): every caller then gets
    SQLAlchemy's DBAPIError for a database it cannot reach, never a bare OSError."""
    import asyncpg  # type: ignore[import-untyped]  # no type hints; only its connect and one error class are used

    # The options libpq URLs carry most often (managed databases add sslmode), in asyncpg's terms.
    params = {LIBPQ_OPTIONS.get(k, k): v for k, v in params.items()}
    if "application_name" in params:
        params["server_settings"] = {**params.get("server_settings", {}),
                                     "application_name": str(params.pop("application_name"))}
    timeout = float(params.get("timeout", CONNECT_TIMEOUT_S))
    params["timeout"] = timeout if timeout > 0 else CONNECT_TIMEOUT_S
    try:
        return await asyncpg.connect(*args, **params)
    except OSError as exc:  # TimeoutError is one
        raise asyncpg.exceptions.ClientCannotConnectError(f"cannot reach the database: {exc!r}") from exc


def make_sessionmaker(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, expire_on_commit=False)


# The advisory lock held while the schema is created on PostgreSQL (any constant: "livesale").
SCHEMA_LOCK_KEY = int.from_bytes(b"livesale", "big") >> 1


async def create_schema(engine: AsyncEngine) -> None:
    """Create the tables declared on Base that are missing (their modules must be imported)."""
    async with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            # Servers starting at once on a new database would each CREATE TABLE, and PostgreSQL
            # fails all but one on its catalog's unique index: one at a time, the others find the tables.
            await conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": SCHEMA_LOCK_KEY})
        await conn.run_sync(Base.metadata.create_all)


async def ping(engine: AsyncEngine) -> None:
    async with engine.connect() as conn:
        await conn.execute(text("SELECT 1"))
