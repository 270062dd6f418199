"""Background loops that stop when cancelled, even when a cancel was swallowed.

On Python 3.11, asyncio.wait_for (which redis-py uses for socket timeouts)
can swallow a cancel that lands just as the awaited call completes. The task
still counts the request (Task.cancelling()), so each loop checks it on
every pass instead of trusting the CancelledError to arrive.
"""

from __future__ import annotations

import asyncio
import logging

log = logging.getLogger("livesale.loops")


def running() -> bool:
    """False once the current task has been asked to stop."""
    task = asyncio.current_task()
    return task is None or task.cancelling() == 0


async def stop(tasks: list[asyncio.Task[None]], timeout_s: float = 5.0) -> None:
    """Cancel tasks and wait (bounded) until they are done, cancelling again if one lingers."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    pending = [t for t in tasks if not t.done()]
    while pending and asyncio.get_running_loop().time() < deadline:
        for task in pending:
            task.cancel()
        await asyncio.wait(pending, timeout=0.25)
        pending = [t for t in pending if not t.done()]
    for task in tasks:
        if not task.done():
            log.error("background task %s did not stop", task.get_name())
        elif not task.cancelled() and task.exception() is not None:
            log.error("background task %s failed: %r", task.get_name(), task.exception())
