"""Loading Redis Lua scripts kept as .lua files beside the code that runs them.

Lua scripts cannot import: a prelude (a file of shared functions) is loaded by putting its text
in front of the script's. A script's header says which preludes it is loaded after.
"""

from __future__ import annotations

from importlib import resources

from redis.commands.core import AsyncScript

from server.backends.redis_client import RedisClient

Prelude = tuple[str, str]  # package, file name

NOW_MS: Prelude = ("server.backends", "now_ms.lua")  # now_ms(): the Redis server's clock


def load_script(redis: RedisClient, package: str, filename: str, *preludes: Prelude) -> AsyncScript:
    """Register a script; redis-py runs it by SHA and loads it again if Redis forgot it (a restart)."""
    parts = [resources.files(p).joinpath(f).read_text() for p, f in (*preludes, (package, filename))]
    return redis.register_script("\n".join(parts))
