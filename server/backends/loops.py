"""Background loops: one shape for all of them, and a stop that is sure to stop them.

On Python 3.11, asyncio.wait_for (which redis-py uses for socket timeouts)
can swallow a cancel that lands just as the awaited call completes. The task
still counts the request (Task.cancelling()), so each loop checks it on
every pass instead of trusting the CancelledError to arrive.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from sqlalchemy.exc import SQLAlchemyError

from server.backends.redis_client import REDIS_ERRORS

log = logging.getLogger("livesale.loops")

# What a pass may meet when a backend is away or slow: logged in one line, then retried. Anything
# else is a bug and is logged with its traceback (and retried too: one bad pass must not stop a loop).
BACKEND_ERRORS = (*REDIS_ERRORS, SQLAlchemyError, OSError)


def running() -> bool:
    """False once the current task has been asked to stop."""
    task = asyncio.current_task()
    return task is None or task.cancelling() == 0


async def repeat(step: Callable[[], Awaitable[float | None]], *, every_s: float, what: str,
                 logger: logging.Logger, retry_s: float | None = None) -> None:
    """Run `step` until cancelled, `every_s` apart, or after the pause the step returns (0: go on at
    once). A step that fails is logged and run again after `retry_s` (default `every_s`)."""
    while running():
        try:
            pause = await step()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            logger.warning("%s failed (%r); retrying", what, exc, exc_info=not isinstance(exc, BACKEND_ERRORS))
            pause = every_s if retry_s is None else retry_s
        await asyncio.sleep(every_s if pause is None else pause)


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
