"""Loading Redis Lua scripts kept as .lua files next to the code that runs them."""

from __future__ import annotations

from importlib import resources

from redis.asyncio import Redis
from redis.commands.core import AsyncScript


def load_script(redis: Redis, package: str, filename: str) -> AsyncScript:
    """Register a script; redis-py runs it by SHA and reloads it if Redis forgot it (after a restart)."""
    source = resources.files(package).joinpath(filename).read_text()
    return redis.register_script(source)
