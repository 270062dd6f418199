"""A restart on the same data dir keeps accounts, sessions, logouts, products and rooms; servers
starting together on a new database create its schema once."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
from sqlalchemy import inspect

from server.app import ensure_schema
from server.backends.sql import Base, make_engine
from server.config import Settings
from tests.support import ServerProcess, bearer

PASSWORD = "correct horse battery"


def test_restart_with_embedded_valkey_keeps_data(data_dir: Path) -> None:
    env = {"LIVESALE_SECRET_KEY": ""}
    with ServerProcess(data_dir, redis_url=None, env=env) as srv, httpx.Client(base_url=srv.url, timeout=30) as c:
        reg = c.post("/api/auth/register", json={"username": "Keeper", "password": PASSWORD, "role": "host"})
        assert reg.status_code == 201, reg.text
        token = reg.json()["token"]
        product = c.post("/api/products", json={"name": "Kept tea", "price_cents": 1200, "commission_rate_bp": 900},
                         headers=bearer(token))
        assert product.status_code == 201, product.text
        room = c.post("/api/rooms", json={"title": "Kept room"}, headers=bearer(token))
        assert room.status_code == 201, room.text
        live = c.post(f"/api/rooms/{room.json()['id']}/start", headers=bearer(token))
        assert live.status_code == 200, live.text
        dropped = c.post("/api/auth/login", json={"username": "keeper", "password": PASSWORD}).json()["token"]
        assert c.post("/api/auth/logout", headers=bearer(dropped)).status_code == 200
    assert (data_dir / "secret_key").is_file()
    assert (data_dir / "livesale.db").is_file()
    assert (data_dir / "redis").is_dir()

    with ServerProcess(data_dir, redis_url=None, env=env) as srv, httpx.Client(base_url=srv.url, timeout=30) as c:
        me = c.get("/api/me", headers=bearer(token))
        assert me.status_code == 200, me.text
        assert me.json()["user_id"] == reg.json()["user_id"]
        revoked = c.get("/api/me", headers=bearer(dropped))
        assert revoked.status_code == 401
        assert revoked.json()["error"] == "session_revoked"

        login = c.post("/api/auth/login", json={"username": "KEEPER", "password": PASSWORD})
        assert login.status_code == 200, login.text
        assert login.json()["user_id"] == reg.json()["user_id"]

        assert c.get("/api/products", headers=bearer(token)).json() == [product.json()]
        assert c.get(f"/api/products/{product.json()['id']}").json() == product.json()
        assert c.get(f"/api/rooms/{room.json()['id']}").json() == live.json()
        assert [r["id"] for r in c.get("/api/rooms", params={"status": "live"}).json()] == [room.json()["id"]]
        taken = c.post("/api/auth/register", json={"username": "keeper", "password": PASSWORD, "role": "viewer"})
        assert taken.status_code == 409


async def test_servers_starting_together_create_the_schema_once(sql_url: str, tmp_path: Path) -> None:
    """Six start-ups at once on a new database (SQLite, then PostgreSQL, where concurrent CREATE
    TABLEs fail on the catalog): every one succeeds and the schema is whole."""
    settings = Settings(data_dir=tmp_path, redis_url=None, database_url=sql_url, secret_key="")
    await asyncio.gather(*(ensure_schema(settings) for _ in range(6)))
    engine = make_engine(sql_url)
    try:
        async with engine.connect() as conn:
            tables = set(await conn.run_sync(lambda sync: inspect(sync).get_table_names()))
    finally:
        await engine.dispose()
    assert tables == set(Base.metadata.tables)
