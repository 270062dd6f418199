"""Servers started as subprocesses: `livesale serve` (`Livesale`: the bench's on a fresh data dir
with its embedded Valkey, the tests' with the options they set) and the bare baseline app.
Loopback, free ports, and always stopped (the whole process group) when the `with` block ends."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Self

from load.machine import children, cmdline, cpu_s, cpu_wait_s, rss_kib

REPO = Path(__file__).resolve().parent.parent
START_TIMEOUT_S = 60.0


def free_port() -> int:
    """A loopback TCP port nobody listens on (for a server to bind a moment later)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stop_group(proc: subprocess.Popen[bytes] | None, sig: int = signal.SIGTERM, timeout: float = 20.0) -> None:
    """Ask a process started with start_new_session to stop with `sig`; SIGKILL its whole group if
    it has not stopped in `timeout` seconds."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def health(url: str) -> int | None:
    """GET /healthz's status, None if it did not answer (stdlib only, no proxies: this runs
    before any event loop)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url + "/healthz", timeout=1) as r:
            return int(r.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except (OSError, ValueError):
        return None


def healthy(url: str) -> bool:
    return health(url) == 200


class Served:
    """A server subprocess in its own process group."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], port: int, workdir: Path,
                 cwd: Path = REPO) -> None:
        self.name = name
        self.argv = argv
        self.env = env
        self.port = port
        self.workdir = workdir
        self.cwd = cwd  # `python -m` imports from here first
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / f"{name}.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = START_TIMEOUT_S, ready: int = 200) -> Self:
        """Start it and wait until /healthz answers `ready` (its log tail in the error if it never does)."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.argv, cwd=self.cwd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log()}")
            if health(self.url) == ready:
                return self
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"{self.name} did not become healthy in {timeout:.0f}s:\n{self.log()}")

    def log(self, chars: int = 5000) -> str:
        """The end of its log (stdout and stderr)."""
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""

    def app_pids(self) -> list[int]:
        """The processes serving requests: uvicorn's workers when there are several, else the main one."""
        if self.proc is None:
            return []
        kids = [p for p in children(self.proc.pid)
                if not any(name in cmdline(p) for name in ("valkey", "redis", "server jobs"))]
        return kids or [self.proc.pid]

    def _child(self, name: str) -> int | None:
        """The child process whose command line holds `name`, if any."""
        if self.proc is None:
            return None
        return next((p for p in children(self.proc.pid) if name in cmdline(p)), None)

    def engine_pid(self) -> int | None:
        return self._child("valkey")

    def jobs_pid(self) -> int | None:
        """livesale's background-jobs process (persister, sweeper), if it has one."""
        return self._child("server jobs")

    def cpu_s(self) -> tuple[float, float, float]:
        """CPU seconds used so far by the app processes, the embedded engine and the jobs process."""
        engine, jobs = self.engine_pid(), self.jobs_pid()
        return (sum(cpu_s(p) for p in self.app_pids()), cpu_s(engine) if engine else 0.0,
                cpu_s(jobs) if jobs else 0.0)

    def cpu_wait_s(self) -> float:
        """Seconds the app processes' main threads were ready to run but waited for a CPU."""
        return sum(cpu_wait_s(p) for p in self.app_pids())

    def rss_kib(self) -> int:
        return sum(rss_kib(p) for p in self.app_pids())

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM, then SIGKILL to the whole process group if it has not exited in `timeout` seconds."""
        proc, self.proc = self.proc, None
        stop_group(proc, signal.SIGTERM, timeout)

    def kill(self) -> None:
        """SIGKILL the whole process group, as a crash would."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()


class Livesale(Served):
    """`livesale serve` on 127.0.0.1 with `data_dir` as its data dir (and its log file there), loopback
    exempt from per-IP limits. Settings come from `env`, over this process's environment without
    REDIS_URL, DATABASE_URL and LIVESALE_HOST: the embedded Valkey and SQLite unless `redis_url` or
    `env` names others. `secret_key` None: the server's own (generated and kept in the data dir).
    `python` and `cwd`: another interpreter's installed livesale (this checkout's by default)."""

    def __init__(self, data_dir: Path, *, redis_url: str | None = None, env: Mapping[str, str] | None = None,
                 workers: int = 1, port: int | None = None, secret_key: str | None = None,
                 log_level: str = "warning", name: str | None = None, python: str = sys.executable,
                 cwd: Path = REPO) -> None:
        port = port or free_port()
        full = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "DATABASE_URL", "LIVESALE_HOST")}
        full.update({"LIVESALE_DATA_DIR": str(data_dir), "LIVESALE_RATE_LIMIT_EXEMPT_IPS": "127.0.0.1",
                     "PYTHONUNBUFFERED": "1"})
        if secret_key is not None:
            full["LIVESALE_SECRET_KEY"] = secret_key
        full.update(env or {})
        if redis_url is not None:
            full["REDIS_URL"] = redis_url
        argv = [python, "-m", "server", "serve", "--host", "127.0.0.1", "--port", str(port),
                "--workers", str(workers), "--log-level", log_level]
        super().__init__(name or f"server-{port}", argv, full, port, data_dir, cwd)
        self.data_dir = data_dir
        self.workers = workers
        self.log_level = log_level


def livesale(workdir: Path, workers: int = 1) -> Livesale:
    """A fresh `livesale serve` for the bench: new data dir under `workdir`, embedded Valkey."""
    data = Path(tempfile.mkdtemp(prefix="ls-bench-", dir=workdir))
    return Livesale(data, workers=workers, name=f"livesale-w{workers}")


def baseline(workdir: Path, workers: int = 1) -> Served:
    port = free_port()
    return Served(f"baseline-w{workers}", [sys.executable, "-m", "load.baseline_app", "--port", str(port),
                                           "--workers", str(workers)], dict(os.environ), port, workdir)


def remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
