"""The background jobs in a process of their own: the persister (orders to SQL)
and the sweeper (expired orders, a sale's start and end).

`livesale serve` starts one beside its web workers and restarts it if it dies.
Apart, a purchase spike and the SQL writes it causes do not share one
interpreter: each had its own core, and the persister's per-order SQL work no
longer delays answers to buyers. Nothing is lost while it is down: orders wait
in the sales' streams until a persister reads them. `livesale jobs` runs it on
its own, for deployments that place it themselves.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import threading
import time

from server.config import Settings
from server.embedded_redis import die_with_parent
from server.loops import stop as stop_loops
from server.wiring import wire

log = logging.getLogger("livesale.jobs")

STOP_TIMEOUT_S = 15.0
PARENT_ENV = "LIVESALE_JOBS_PARENT_PID"  # set by `serve` for the child it starts


def follow_parent() -> None:
    """Started by `serve`: die with it. Set here, in the child, rather than between fork and
    exec, where a threaded parent must not run Python."""
    parent = os.environ.get(PARENT_ENV)
    if parent is None:
        return
    die_with_parent()
    if os.getppid() != int(parent):  # it died before the line above
        raise SystemExit(0)


async def run_jobs(settings: Settings, redis_url: str) -> int:
    """Run until SIGTERM or SIGINT (0), or until a job's loop ends, which it never should (1:
    `serve` restarts the process)."""
    wired = await wire(settings, redis_url)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loops = {**wired.background_jobs(), "notifier": wired.notifier.run()}
    tasks = [asyncio.create_task(coro, name=name) for name, coro in loops.items()]
    stopping = asyncio.create_task(stop.wait())
    log.info("background jobs running: %s", ", ".join(loops))
    try:
        await asyncio.wait([stopping, *tasks], return_when=asyncio.FIRST_COMPLETED)
        ended = [t.get_name() for t in tasks if t.done()]
        if ended:
            log.error("background job %s ended; exiting so that it is restarted", ", ".join(ended))
            return 1
        return 0
    finally:
        stopping.cancel()
        await stop_loops(tasks)
        await wired.close()


class JobsProcess:
    """`python -m server jobs` as a child of `serve`: dies with it, restarted if it exits."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.process: subprocess.Popen[bytes] | None = None
        self.restarts = 0
        self._stopping = threading.Event()
        self._watchdog: threading.Thread | None = None

    def start(self) -> None:
        self._launch()
        self._watchdog = threading.Thread(target=self._watch, name="jobs-watchdog", daemon=True)
        self._watchdog.start()

    def _launch(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "server", "jobs"], env={**self.env, PARENT_ENV: str(os.getpid())},
            stdin=subprocess.DEVNULL,
            # Own session: a Ctrl-C reaches `serve`, which stops this in order.
            start_new_session=True)

    def _watch(self) -> None:
        # Restarts fork from this thread, which lives as long as `serve`, so the child's
        # parent-death signal (bound to the forking thread) still means "dies with serve".
        backoff = 0.5
        launched = time.monotonic()
        while not self._stopping.wait(0.5):
            proc = self.process
            if proc is None or proc.poll() is None:
                continue
            if proc.returncode == 0:
                # Stopped on purpose (SIGTERM or SIGINT to it, or to the whole service group
                # as a service manager stops it): not restarted.
                log.warning("background jobs stopped by a signal; not restarting them")
                return
            if time.monotonic() - launched > 60:
                backoff = 0.5  # it had been running fine: a new failure, not a crash loop
            log.error("background jobs exited with %s; restarting in %.1fs", proc.returncode, backoff)
            if self._stopping.wait(backoff):
                return
            backoff = min(backoff * 2, 10.0)
            try:
                self._launch()
            except (OSError, subprocess.SubprocessError) as exc:  # no process now; try again later
                log.error("could not restart the background jobs: %r", exc)
                continue
            launched = time.monotonic()
            self.restarts += 1

    def stop(self) -> None:
        self._stopping.set()
        if self._watchdog is not None:
            self._watchdog.join()
            self._watchdog = None
        proc, self.process = self.process, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            log.error("background jobs did not stop in %.0fs; killed", STOP_TIMEOUT_S)
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
