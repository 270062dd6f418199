"""GET /healthz, and how the server answers while Redis is down and after it is back."""

from __future__ import annotations

import time
from pathlib import Path

import httpx

from load.servers import free_port
from server.backends.embedded_valkey import EmbeddedValkey
from tests.support import ServerProcess, bearer


async def test_healthz_reports_both_backends(client: httpx.AsyncClient) -> None:
    r = await client.get("/healthz")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("application/json")
    assert r.json() == {"status": "ok", "redis": "ok", "database": "ok", "pubsub": "ok", "jobs": "ok"}


def wait_for_health(url: str, status: int, attempts: int = 100) -> httpx.Response:
    r = httpx.get(url + "/healthz", timeout=10)
    for _ in range(attempts):
        if r.status_code == status:
            break
        time.sleep(0.1)
        r = httpx.get(url + "/healthz", timeout=10)
    return r


def test_redis_down_gives_503_and_recovery_gives_200_with_room_events_back(tmp_path: Path) -> None:
    engine = EmbeddedValkey(tmp_path, port=free_port())
    engine.start()
    try:
        with ServerProcess(tmp_path / "data", redis_url=engine.url) as srv:
            r = httpx.post(srv.url + "/api/auth/guest", json={"name": "Down"}, timeout=10)
            assert r.status_code == 201, r.text
            token = r.json()["token"]

            engine.stop()
            r = wait_for_health(srv.url, 503)
            assert r.status_code == 503, r.text
            body = r.json()
            assert body["status"] == "unavailable"
            assert body["redis"].startswith("error")
            assert body["database"] == "ok"
            for _ in range(100):  # the pub/sub link notices on its next read, within moments
                if body["pubsub"] == "down":
                    break
                time.sleep(0.1)
                body = httpx.get(srv.url + "/healthz", timeout=10).json()
            assert body["pubsub"] == "down", body

            r = httpx.get(srv.url + "/api/me", headers=bearer(token), timeout=30)
            assert r.status_code == 503, r.text
            assert r.json()["error"] == "unavailable"
            assert r.headers["retry-after"] == "1"

            engine.start()
            r = wait_for_health(srv.url, 200)
            assert r.status_code == 200, r.text
            assert r.json() == {"status": "ok", "redis": "ok", "database": "ok", "pubsub": "ok", "jobs": "ok"}
            assert httpx.get(srv.url + "/api/me", headers=bearer(token), timeout=10).status_code == 200
    finally:
        engine.stop()
