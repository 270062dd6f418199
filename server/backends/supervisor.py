"""Child processes that live as long as the app: restarted when they exit, stopped in order.

Used by the embedded engine (server/backends/embedded_valkey.py) and the jobs process (server/jobs.py).
"""

from __future__ import annotations

import ctypes
import logging
import signal
import subprocess
import sys
import threading
import time

log = logging.getLogger("livesale.supervisor")

STABLE_S = 60.0  # a child that ran this long and then exits is a new failure, not a crash loop


def die_with_parent() -> None:
    """In a child: get SIGTERM when the parent dies, rather than linger as an orphan (the engine
    then shuts down cleanly, flushing its AOF). Linux only."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)  # the C library already loaded (glibc or musl)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class Supervised:
    """One child process; subclasses launch it (`_launch` sets `self.process`). `watch()` starts a
    watchdog thread that relaunches it whenever it exits, with a backoff from 0.5 s doubling to
    10 s while it keeps failing. Relaunches fork from that thread, which lives as long as the app,
    so a parent-death signal (bound to the forking thread) still means "dies with the app"."""

    name = "child"
    stop_timeout_s = 15.0

    def __init__(self) -> None:
        self.process: subprocess.Popen[bytes] | None = None
        self.restarts = 0
        self._stopping = threading.Event()
        self._watchdog: threading.Thread | None = None

    def _launch(self) -> None:
        raise NotImplementedError

    def watch(self) -> None:
        self._stopping.clear()
        self._watchdog = threading.Thread(target=self._watch, name=f"{self.name}-watchdog", daemon=True)
        self._watchdog.start()

    def _watch(self) -> None:
        backoff = 0.5
        launched = time.monotonic()
        while not self._stopping.wait(0.5):
            proc = self.process
            if proc is None or proc.poll() is None:
                continue
            self._stopped(proc)
            # Whatever the exit, a signal sent to the child alone included: only stop() stops it.
            if time.monotonic() - launched > STABLE_S:
                backoff = 0.5
            log.error("%s exited with %s; restarting in %.1fs", self.name, proc.returncode, backoff)
            if self._stopping.wait(backoff):
                return
            backoff = min(backoff * 2, 10.0)
            try:
                self._launch()
            except Exception as exc:  # nothing runs now; try again after the backoff
                log.error("%s restart failed: %s", self.name, exc)
                continue
            launched = time.monotonic()
            self.restarts += 1

    def stop(self) -> None:
        """Stop watching, then SIGTERM the child (killed if it outlasts stop_timeout_s)."""
        self._stopping.set()
        if self._watchdog is not None and self._watchdog is not threading.current_thread():
            self._watchdog.join()
            self._watchdog = None
        proc, self.process = self.process, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(self.stop_timeout_s)
            except subprocess.TimeoutExpired:
                log.error("%s did not stop in %.0fs; killed", self.name, self.stop_timeout_s)
                proc.kill()
                proc.wait()
        self._stopped(proc)

    def _stopped(self, proc: subprocess.Popen[bytes]) -> None:
        """After the child is gone (a hook for closing its pipes)."""
