"""The `livesale` command: help texts, and `demo` creating a host, a room and three products."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from server.demo import PRODUCTS
from tests.support import REPO, ServerProcess, bearer

DEMO_OUTPUT = re.compile(r"Viewer room\s*:\s*(?P<base>\S+)/rooms/(?P<room>room_[a-z2-7]{26})\n"
                         r"\s*Log in as\s*:\s*(?P<user>\S+) / (?P<password>\S+)\n")


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "server", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=60)


def demo_env(data_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "LIVESALE_SECRET_KEY", "DATABASE_URL")}
    return {**env, "LIVESALE_DATA_DIR": str(data_dir)}


def test_help() -> None:
    out = run_cli("--help")
    assert out.returncode == 0, out.stderr
    assert "serve" in out.stdout and "demo" in out.stdout
    assert "LIVESALE_DATA_DIR" in out.stdout


def test_serve_help() -> None:
    out = run_cli("serve", "--help")
    assert out.returncode == 0, out.stderr
    for option in ("--host", "--port", "--workers", "--log-level"):
        assert option in out.stdout


def test_unknown_command_fails() -> None:
    out = run_cli("nonsense")
    assert out.returncode != 0
    assert "nonsense" in out.stderr


def test_demo_creates_a_host_room_and_products(data_dir: Path, redis_url: str) -> None:
    first = run_cli("demo", env=demo_env(data_dir))
    assert first.returncode == 0, first.stderr
    assert "Demo ready." in first.stdout
    m = DEMO_OUTPUT.search(first.stdout)
    assert m, first.stdout
    assert m["base"] == "http://127.0.0.1:8000"
    assert m["user"] == "demo-host"
    assert f"{m['base']}/console" in first.stdout

    second = run_cli("demo", "--base-url", "http://example.test:9000/", env=demo_env(data_dir))
    assert second.returncode == 0, second.stderr
    m2 = DEMO_OUTPUT.search(second.stdout)
    assert m2, second.stdout
    assert m2["base"] == "http://example.test:9000"
    assert m2["room"] == m["room"]
    assert m2["password"] != m["password"]

    with ServerProcess(data_dir, redis_url=redis_url) as srv, httpx.Client(base_url=srv.url, timeout=30) as c:
        stale = c.post("/api/auth/login", json={"username": "demo-host", "password": m["password"]})
        assert stale.status_code == 401
        login = c.post("/api/auth/login", json={"username": "demo-host", "password": m2["password"]})
        assert login.status_code == 200, login.text
        host = login.json()
        assert host["role"] == "host"
        assert host["guest"] is False

        products = c.get("/api/products", headers=bearer(host["token"])).json()
        assert sorted(p["name"] for p in products) == sorted(name for name, *_ in PRODUCTS)
        assert all(p["host_id"] == host["user_id"] and p["price_cents"] > 0 for p in products)

        room = c.get(f"/api/rooms/{m['room']}")
        assert room.status_code == 200, room.text
        assert room.json()["host"] == {"id": host["user_id"], "name": "demo-host"}
        assert room.json()["status"] == "scheduled"
        assert room.json()["url"] == f"/rooms/{m['room']}"
        listed = c.get("/api/rooms", params={"host_id": host["user_id"]}).json()
        assert [r["id"] for r in listed] == [m["room"]]


def test_demo_does_not_take_over_a_viewer_account(data_dir: Path, redis_url: str) -> None:
    with ServerProcess(data_dir, redis_url=redis_url) as srv, httpx.Client(base_url=srv.url, timeout=30) as c:
        viewer = c.post("/api/auth/register",
                        json={"username": "taken-name", "password": "viewer's own password", "role": "viewer"})
        assert viewer.status_code == 201, viewer.text
        out = run_cli("demo", "--username", "taken-name", env=demo_env(data_dir))
        own = c.post("/api/auth/login", json={"username": "taken-name", "password": "viewer's own password"})
        assert own.status_code == 200, "the viewer's password was replaced"
        if out.returncode == 0:
            m = DEMO_OUTPUT.search(out.stdout)
            assert m, out.stdout
            login = c.post("/api/auth/login", json={"username": m["user"], "password": m["password"]})
            assert login.status_code == 200
            assert login.json()["role"] == "host"


@pytest.mark.parametrize("username", ["x" * 65, "no spaces", "ab"])
def test_demo_refuses_a_username_registration_would_refuse(data_dir: Path, username: str) -> None:
    """Checked before anything is written (a name over 64 characters was a traceback on PostgreSQL,
    printing the new password's hash, and on SQLite a login that could never work)."""
    out = run_cli("demo", "--username", username, env=demo_env(data_dir))
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    assert "--username" in out.stderr and not (data_dir / "livesale.db").exists(), out.stderr
