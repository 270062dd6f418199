"""The background jobs in a process of their own: the persister (orders to SQL),
the sweeper (expired orders, a sale's start and end) and the late captures.

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

from server.backends.loops import stop as stop_loops
from server.backends.supervisor import Supervised, die_with_parent
from server.config import Settings
from server.wiring import build_jobs

log = logging.getLogger("livesale.jobs")

STOP_TIMEOUT_S = 15.0


def follow_parent(parent_pid: int) -> None:
    """Started by `serve`: die with it. Set here, in the child, rather than between fork and
    exec, where a threaded parent must not run Python."""
    die_with_parent()
    if os.getppid() != parent_pid:  # it died before the line above
        raise SystemExit(0)


async def run_jobs(settings: Settings, redis_url: str) -> int:
    """Run until SIGTERM or SIGINT (0), or until a job's loop ends, which it never should (1:
    `serve` restarts the process)."""
    jobs = await build_jobs(settings, redis_url)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loops = jobs.loops()
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
        await jobs.close()


class JobsProcess(Supervised):
    """`python -m server jobs` as a child of `serve`: dies with it, restarted if it fails."""

    name = "background jobs"
    stop_timeout_s = STOP_TIMEOUT_S

    def __init__(self, log_level: str) -> None:
        super().__init__()
        self.log_level = log_level

    def start(self) -> None:
        self._launch()
        self.watch()

    def _launch(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "server", "jobs", "--log-level", self.log_level, "--parent", str(os.getpid())],
            stdin=subprocess.DEVNULL,
            # Own session: a Ctrl-C reaches `serve`, which stops this in order.
            start_new_session=True)
