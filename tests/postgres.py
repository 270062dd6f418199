"""A private PostgreSQL server for the tests: Debian's binaries (`apt-get install postgresql`),
a fresh cluster in a temporary directory, TCP on 127.0.0.1 only with a random password, stopped
by whoever started it.

PostgreSQL refuses to run as root; as root the cluster belongs to the `postgres` user the Debian
package creates (or `nobody`), with that user's own group. Durability is off (fsync): a test
database is thrown away."""

from __future__ import annotations

import asyncio
import glob
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import asyncpg
import pytest

from load.servers import free_port, stop_group
from tests.support import ServerProcess

USER = "livesale"


def find_bin_dir() -> Path | None:
    """LIVESALE_TEST_PG_BIN, else the newest /usr/lib/postgresql/*/bin, else `initdb` on PATH."""
    if configured := os.environ.get("LIVESALE_TEST_PG_BIN"):
        return Path(configured)
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"),
                      key=lambda p: int(Path(p).parent.parent.name) if Path(p).parent.parent.name.isdigit() else 0)
    if versions:
        return Path(versions[-1]).parent
    found = shutil.which("initdb")
    return Path(found).resolve().parent if found else None


def _run_as() -> pwd.struct_passwd | None:
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    raise RuntimeError("running as root, and there is neither a `postgres` nor a `nobody` user to run PostgreSQL as")


class Postgres:
    def __init__(self, bin_dir: Path) -> None:
        self.bin_dir = bin_dir
        self.port = free_port()
        self.user = _run_as()
        self.password = secrets.token_urlsafe(16)
        # Not under pytest's tmp dirs: those are private to root, and the server may run as another user.
        self.dir = Path(tempfile.mkdtemp(prefix="livesale-pg-"))
        self.data = self.dir / "data"
        self.proc: subprocess.Popen[bytes] | None = None

    def _spawn(self, argv: list[str], log: IO[bytes], *, own_session: bool = False) -> subprocess.Popen[bytes]:
        u = self.user
        return subprocess.Popen(argv, cwd=self.dir, stdout=log, stderr=subprocess.STDOUT, start_new_session=own_session,
                                user=u.pw_uid if u else None, group=u.pw_gid if u else None,
                                extra_groups=[] if u else None)

    def start(self, timeout: float = 60.0) -> str:
        """A new cluster, then the server on it; the URL of its `postgres` database."""
        if self.user is not None:
            os.chown(self.dir, self.user.pw_uid, self.user.pw_gid)
        pwfile = self.dir / "pwfile"
        pwfile.write_text(self.password)
        if self.user is not None:
            os.chown(pwfile, self.user.pw_uid, self.user.pw_gid)
        with open(self.dir / "postgres.log", "ab") as log:
            init = self._spawn([str(self.bin_dir / "initdb"), "-D", str(self.data), "-U", USER, "--pwfile", str(pwfile),
                                "--auth=scram-sha-256", "-E", "UTF8", "--locale=C", "--no-sync"], log)
            try:
                failed = init.wait(timeout) != 0
            except subprocess.TimeoutExpired:
                init.kill()
                init.wait()
                failed = True
            if failed:
                raise RuntimeError(f"initdb failed:\n{self.log()}")
        self.resume(timeout)
        return self.url("postgres")

    def resume(self, timeout: float = 60.0) -> None:
        """Run the server on the cluster (again, after `halt`), on the same port."""
        with open(self.dir / "postgres.log", "ab") as log:
            self.proc = self._spawn(
                [str(self.bin_dir / "postgres"), "-D", str(self.data), "-p", str(self.port),
                 "-c", "listen_addresses=127.0.0.1", "-c", "unix_socket_directories=",
                 "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
                 "-c", "max_connections=300"], log, own_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"postgres exited with {self.proc.returncode}:\n{self.log()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"postgres did not listen in {timeout}s:\n{self.log()}")

    def url(self, database: str) -> str:
        return f"postgresql+asyncpg://{USER}:{self.password}@127.0.0.1:{self.port}/{database}"

    async def connect(self, database: str = "postgres") -> asyncpg.Connection:
        """A connection of the test's own, as the superuser (waits while the server starts up)."""
        deadline = time.monotonic() + 30
        while True:  # the server listens a moment before it accepts logins
            try:
                return await asyncpg.connect(host="127.0.0.1", port=self.port, user=USER, password=self.password,
                                             database=database, timeout=5)
            except (asyncpg.CannotConnectNowError, OSError):  # OSError: refused, or no answer in 5 s
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.1)

    async def new_database(self, prefix: str = "t") -> str:
        """A fresh, empty database; its SQLAlchemy URL."""
        name = f"{prefix}_{secrets.token_hex(6)}"
        conn = await self.connect()
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()
        return self.url(name)

    def log(self) -> str:
        path = self.dir / "postgres.log"
        return path.read_text(errors="replace")[-5000:] if path.exists() else ""

    def halt(self, timeout: float = 30.0) -> None:
        """Stop the server, keeping the cluster (`resume` starts it again)."""
        proc, self.proc = self.proc, None
        stop_group(proc, signal.SIGINT, timeout)  # SIGINT: "fast" shutdown, ends sessions at once

    def stop(self) -> None:
        self.halt()
        shutil.rmtree(self.dir, ignore_errors=True)


@contextmanager
def running_postgres() -> Iterator[Postgres]:
    """A started PostgreSQL, stopped and removed on the way out; skips the test if none is installed."""
    bin_dir = find_bin_dir()
    if bin_dir is None:
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql, or set LIVESALE_TEST_PG_BIN)")
    pg = Postgres(bin_dir)
    try:
        pg.start()
        yield pg
    finally:
        pg.stop()


def on_every_backend() -> object:
    """`on_both_databases`, and then on a Redis Cluster: the module's tests that use a server
    run on SQLite, on PostgreSQL and on the session's 3-master Valkey Cluster (with SQLite)."""
    names = {"sqlite": "sqlite_server", "postgresql": "pg_server", "cluster": "cluster_server"}

    @pytest.fixture(scope="module", params=list(names))
    def server(request: pytest.FixtureRequest) -> ServerProcess:
        chosen: ServerProcess = request.getfixturevalue(names[request.param])
        return chosen
    return server


def on_both_databases() -> object:
    """A module's `server` fixture that is the session's shared server (SQLite), then the one on
    PostgreSQL: `server = on_both_databases()` runs the module's tests that use a server on both.
    It asks for the two by their own names: asking for `server` here would hand the parameter on
    to the session fixture, which would then be restarted at every switch."""
    @pytest.fixture(scope="module", params=["sqlite", "postgresql"])
    def server(request: pytest.FixtureRequest) -> ServerProcess:
        chosen: ServerProcess = request.getfixturevalue("sqlite_server" if request.param == "sqlite" else "pg_server")
        return chosen
    return server
