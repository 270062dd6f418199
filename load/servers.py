"""Servers the bench starts for itself: `livesale serve` on a fresh data dir with
its embedded Valkey, and the bare baseline app. Loopback, free ports, and always
stopped (the whole process group) when the `with` block ends."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Self

from load.machine import children, cmdline, cpu_s, cpu_wait_s, rss_kib

REPO = Path(__file__).resolve().parent.parent
START_TIMEOUT_S = 60.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def healthy(url: str) -> bool:
    """GET /healthz answered 200 (stdlib only, no proxies: this runs before any event loop)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url + "/healthz", timeout=1) as r:
            return bool(r.status == 200)
    except (OSError, ValueError):
        return False


class Served:
    """A server subprocess in its own process group."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], port: int, workdir: Path) -> None:
        self.name = name
        self.argv = argv
        self.env = env
        self.port = port
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / f"{name}.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.argv, cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log()}")
            if healthy(self.url):
                return
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"{self.name} did not become healthy in {START_TIMEOUT_S:.0f}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:] if self.log_path.exists() else ""

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

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()


def livesale(workdir: Path, workers: int = 1) -> Served:
    """A fresh `livesale serve`: new data dir, embedded Valkey, loopback exempt from per-IP limits."""
    port = free_port()
    data = Path(tempfile.mkdtemp(prefix="ls-bench-", dir=workdir))
    env = {**os.environ, "LIVESALE_DATA_DIR": str(data), "LIVESALE_RATE_LIMIT_EXEMPT_IPS": "127.0.0.1",
           "PYTHONUNBUFFERED": "1"}
    for name in ("REDIS_URL", "DATABASE_URL", "LIVESALE_HOST"):  # its own engine and database, on loopback
        env.pop(name, None)
    return Served(f"livesale-w{workers}", [sys.executable, "-m", "server", "serve", "--host", "127.0.0.1",
                                           "--port", str(port), "--workers", str(workers), "--log-level", "warning"],
                  env, port, data)


def baseline(workdir: Path, workers: int = 1) -> Served:
    port = free_port()
    return Served(f"baseline-w{workers}", [sys.executable, "-m", "load.baseline_app", "--port", str(port),
                                           "--workers", str(workers)], dict(os.environ), port, workdir)


def remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
