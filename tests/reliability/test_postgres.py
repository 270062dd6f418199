"""A server whose PostgreSQL goes away and comes back, or ends its session mid-request: SQL work
answers 503 (never a 500, never a dropped connection), purchases and payments go on in Redis, and
SQL catches up afterwards. And a value PostgreSQL refuses answers 422."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Iterator

import msgspec
import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from starlette.requests import Request
from websockets.exceptions import InvalidStatus

from server.api.responses import on_database_error
from server.backends.sql import create_schema, make_engine
from tests.inventory.support import bought, get_sale, launch, new_shop, paid, settle_tracked
from tests.postgres import Postgres, running_postgres
from tests.reliability.support import wait_health, wait_reconciled
from tests.rooms.support import open_viewer
from tests.support import DB_PG_OUTAGE, ServerProcess, api_client, backends, guest, redis_db_url

pytestmark = pytest.mark.reliability


@pytest.fixture
def own_postgres() -> Iterator[Postgres]:
    """A PostgreSQL of this test's own, as this test stops it."""
    with running_postgres() as pg:
        yield pg


async def test_postgresql_away_answers_503_and_sql_catches_up(own_postgres: Postgres, redis_url: str,
                                                             tmp_path: Path) -> None:
    env = {"DATABASE_URL": await own_postgres.new_database()}
    with ServerProcess(tmp_path / "srv", redis_url=redis_db_url(redis_url, DB_PG_OUTAGE), env=env) as srv:
        async with api_client(srv.url) as api:
            shop = await new_shop(api)
            sale = await launch(api, shop, stock=20, per_user_limit=4)
            buyers = [await guest(api, f"pg{i}") for i in range(3)]
            unvisited = await new_shop(api)  # a room no viewer has joined: its details are not cached
            own_postgres.halt()

            # A viewer joining is told to come back (an `error` event, then 1013), not refused mid-handshake.
            try:
                async with open_viewer(srv.url, unvisited.room_id, buyers[1].token, welcome=False) as joiner:
                    events, close = await joiner.expect_close(timeout=30)
            except InvalidStatus as exc:
                raise AssertionError(f"handshake refused: {exc}") from None
            assert [(e["type"], e.get("code")) for e in events] == [("error", "unavailable")], events
            assert close is not None and close.code == 1013, close

            # Everything that needs SQL says so: 503 `unavailable`, Retry-After, on a connection that stays usable.
            for method, path, body in [("GET", "/api/products", None), ("GET", "/api/orders", None),
                                       ("POST", "/api/products", {"name": "Away", "price_cents": 100,
                                                                  "commission_rate_bp": 0})]:
                r = await api.request(method, path, json=body, headers=shop.host.auth)
                assert r.status_code == 503 and r.json()["error"] == "unavailable", (path, r.text)
                assert r.headers["retry-after"] == "1"
            r = await api.post("/api/auth/guest", json={"name": "Late"})
            assert r.status_code == 503 and r.json()["error"] == "unavailable", r.text
            r = await api.get("/healthz")
            assert r.status_code == 503 and r.json()["database"].startswith("error"), r.text

            # Purchases and payments touch only Redis: they go on.
            orders = [await bought(api, b, sale["id"]) for b in buyers]
            await paid(api, buyers[0], orders[0]["order_id"])
            assert (await get_sale(api, sale["id"]))["sold"] == 3

            own_postgres.resume()
            await wait_health(api, 200)
            r = await api.get("/api/orders", headers=buyers[0].auth)
            assert r.status_code == 200, r.text
        async with backends(srv) as (stock, db):
            report = await wait_reconciled(stock, db, sale["id"], timeout=40)
            assert (report.redis_orders, report.sql_orders) == (3, 3), report.lines()
        await settle_tracked(srv.url)
        assert "Traceback" not in srv.log_path.read_text(errors="replace"), srv.log()


async def test_a_session_ended_mid_request_answers_503(own_postgres: Postgres, redis_url: str,
                                                       tmp_path: Path) -> None:
    """The database ends the session of a request waiting on it (an administrator, a failover):
    that request answers 503, and the next one gets a new connection."""
    url = await own_postgres.new_database()
    env = {"DATABASE_URL": url}
    with ServerProcess(tmp_path / "srv", redis_url=redis_db_url(redis_url, DB_PG_OUTAGE), env=env) as srv:
        async with api_client(srv.url) as api:
            shop = await new_shop(api)
            lock = await own_postgres.connect(url.rsplit("/", 1)[1])
            try:
                tx = lock.transaction()
                await tx.start()
                await lock.execute("LOCK TABLE products IN ACCESS EXCLUSIVE MODE")
                waiting = asyncio.create_task(api.get("/api/products", headers=shop.host.auth))
                deadline = time.monotonic() + 15
                pids: list[int] = []
                while not pids and time.monotonic() < deadline:
                    await asyncio.sleep(0.05)
                    pids = [r["pid"] for r in await lock.fetch(
                        "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                        "AND wait_event_type = 'Lock' AND pid <> pg_backend_pid()")]
                assert pids, "the request never waited on the lock"
                await lock.execute("SELECT pg_terminate_backend(pid) FROM unnest($1::int[]) AS pid", pids)
                r = await asyncio.wait_for(waiting, 30)
                assert r.status_code == 503 and r.json()["error"] == "unavailable", r.text
                await tx.rollback()
            finally:
                await lock.close()
            r = await api.get("/api/products", headers=shop.host.auth)
            assert r.status_code == 200, r.text
        assert "Traceback" not in srv.log_path.read_text(errors="replace"), srv.log()


async def test_a_value_postgresql_refuses_answers_422(postgres: Postgres) -> None:
    """A value validation let through but PostgreSQL cannot hold (a NUL in text, too long, out of
    range): asyncpg's errors reach SQLAlchemy as a generic DBAPIError, answered 422, not 500."""
    engine = make_engine(await postgres.new_database())
    try:
        await create_schema(engine)
        insert = text("INSERT INTO users (id, username, name, role) VALUES (:id, :username, 'n', 'viewer')")
        for statement, params in [(insert, {"id": "u1", "username": "a\x00"}),
                                  (insert, {"id": "u2", "username": "a" * 65}),
                                  (text("SELECT CAST(:n AS integer) + 1"), {"n": 2**31 - 1})]:
            with pytest.raises(DBAPIError) as caught:
                async with engine.begin() as conn:
                    await conn.execute(statement, params)
            request = Request({"type": "http", "method": "POST", "path": "/api/x", "headers": []})
            r = await on_database_error(request, caught.value)
            assert r.status_code == 422 and msgspec.json.decode(r.body)["error"] == "invalid", (params, r.body)
    finally:
        await engine.dispose()


async def test_transient_postgresql_errors_answer_503(postgres: Postgres) -> None:
    """A statement or lock timeout, a deadlock: the transaction is gone but a retry may pass, so
    503 with Retry-After, not a 500."""
    url = await postgres.new_database()
    engine = make_engine(url)
    holder = await postgres.connect(url.rsplit("/", 1)[1])
    try:
        await create_schema(engine)
        request = Request({"type": "http", "method": "GET", "path": "/api/x", "headers": []})
        await holder.execute("BEGIN; LOCK TABLE users IN ACCESS EXCLUSIVE MODE")
        for setting, sql in [("statement_timeout", "SELECT pg_sleep(2)"), ("lock_timeout", "SELECT * FROM users")]:
            with pytest.raises(DBAPIError) as caught:
                async with engine.begin() as conn:
                    await conn.execute(text(f"SET LOCAL {setting} = '50ms'"))
                    await conn.execute(text(sql))
            r = await on_database_error(request, caught.value)
            assert r.status_code == 503 and r.headers["retry-after"] == "1", (setting, r.body)
    finally:
        await holder.close()
        await engine.dispose()
