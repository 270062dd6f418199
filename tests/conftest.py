from __future__ import annotations

from pathlib import Path
from typing import Any, AsyncIterator, Iterator

import httpx
import pytest

from server.embedded_redis import EmbeddedRedis
from tests.support import ServerProcess, cookieless_client, free_port, guest, register


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One real Valkey for the session, on a loopback TCP port."""
    engine = EmbeddedRedis(tmp_path_factory.mktemp("valkey"), port=free_port())
    url = engine.start()
    yield url
    engine.stop()


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> Iterator[ServerProcess]:
    """A real `livesale serve` shared by the tests that need no private one."""
    with ServerProcess(tmp_path_factory.mktemp("server"), redis_url=redis_url) as proc:
        yield proc


@pytest.fixture
async def client(server: ServerProcess) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as c:
        yield c


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture(scope="module")
async def api(server: ServerProcess) -> AsyncIterator[httpx.AsyncClient]:
    """A cookieless client on the shared server, one per module."""
    async with cookieless_client(server.url) as c:
        yield c


@pytest.fixture(scope="module")
async def hosts(server: ServerProcess) -> tuple[dict[str, Any], dict[str, Any]]:
    """Two registered hosts per module (registering hashes a password: slow on purpose)."""
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as c:
        return await register(c, "host"), await register(c, "host")


@pytest.fixture
def host(hosts: tuple[dict[str, Any], dict[str, Any]]) -> dict[str, Any]:
    return hosts[0]


@pytest.fixture
def other_host(hosts: tuple[dict[str, Any], dict[str, Any]]) -> dict[str, Any]:
    return hosts[1]


@pytest.fixture
async def viewer(api: httpx.AsyncClient) -> dict[str, Any]:
    return await guest(api, "Vera")
