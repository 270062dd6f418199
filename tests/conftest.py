from __future__ import annotations

from pathlib import Path
from typing import AsyncIterator, Iterator

import httpx
import pytest

from load.cluster import ValkeyCluster
from tests.postgres import Postgres, running_postgres
from tests.support import DB_POSTGRES, Actor, ServerProcess, api_client, guest, redis_db_url, register, valkey


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One real Valkey for the session, on a loopback TCP port."""
    with valkey(tmp_path_factory.mktemp("valkey")) as url:
        yield url


@pytest.fixture(scope="session")
def cluster_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real Valkey Cluster of 3 masters for the session, on loopback ports (its
    redis+cluster:// URL), started only if a test asks for it."""
    with ValkeyCluster(tmp_path_factory.mktemp("cluster"), masters=3) as cluster:
        yield cluster.url


@pytest.fixture(scope="session")
def cluster_server(tmp_path_factory: pytest.TempPathFactory, cluster_url: str) -> Iterator[ServerProcess]:
    """A real `livesale serve` on the session's cluster (and SQLite): modules that declare
    `server = on_every_backend()` run their tests on it too."""
    with ServerProcess(tmp_path_factory.mktemp("cluster-server"), redis_url=cluster_url) as proc:
        yield proc


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    """One real PostgreSQL for the session, started only if a test asks for it."""
    with running_postgres() as pg:
        yield pg


@pytest.fixture(params=["sqlite", "postgresql"])
async def sql_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty database: a SQLite file, then a PostgreSQL database (the tests using this run on both)."""
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'test.db'}"
    pg: Postgres = request.getfixturevalue("postgres")
    return await pg.new_database()


@pytest.fixture(scope="session")
def sqlite_server(tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> Iterator[ServerProcess]:
    """A real `livesale serve` shared by the tests that need no private one (SQLite, Redis database 0)."""
    with ServerProcess(tmp_path_factory.mktemp("server"), redis_url=redis_url) as proc:
        yield proc


@pytest.fixture(scope="session")
def server(sqlite_server: ServerProcess) -> ServerProcess:
    """The shared server; `server = on_both_databases()` in a module makes it `pg_server` as well."""
    return sqlite_server


@pytest.fixture(scope="session")
async def pg_server(tmp_path_factory: pytest.TempPathFactory, redis_url: str,
                    postgres: Postgres) -> AsyncIterator[ServerProcess]:
    """A real `livesale serve` whose database is PostgreSQL (and its own Redis database index):
    modules that declare `server = on_both_databases()` run their tests on it too."""
    env = {"DATABASE_URL": await postgres.new_database("srv")}
    with ServerProcess(tmp_path_factory.mktemp("pg-server"), redis_url=redis_db_url(redis_url, DB_POSTGRES),
                       env=env) as proc:
        yield proc


@pytest.fixture
async def client(server: ServerProcess) -> AsyncIterator[httpx.AsyncClient]:
    """A client that keeps cookies, as a browser does (api_client keeps none)."""
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as c:
        yield c


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture(scope="module")
async def api(server: ServerProcess) -> AsyncIterator[httpx.AsyncClient]:
    """A cookieless client on the shared server, one per module."""
    async with api_client(server.url) as c:
        yield c


@pytest.fixture(scope="module")
async def hosts(server: ServerProcess) -> tuple[Actor, Actor]:
    """Two registered hosts per module (registering hashes a password: slow on purpose)."""
    async with api_client(server.url) as c:
        return await register(c, "host"), await register(c, "host")


@pytest.fixture
def host(hosts: tuple[Actor, Actor]) -> Actor:
    return hosts[0]


@pytest.fixture
def other_host(hosts: tuple[Actor, Actor]) -> Actor:
    return hosts[1]


@pytest.fixture
async def viewer(api: httpx.AsyncClient) -> Actor:
    return await guest(api, "Vera")
