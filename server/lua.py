"""Loading Redis Lua scripts kept as .lua files next to the code that runs them."""

from __future__ import annotations

from importlib import resources

from redis.asyncio import Redis
from redis.commands.core import AsyncScript

GCRA = ("server", "gcra.lua")  # the rate-limit functions, a prelude for scripts that limit


def load_script(redis: Redis, package: str, filename: str, *, prelude: tuple[str, str] | None = None
                ) -> AsyncScript:
    """Register a script; redis-py runs it by SHA and reloads it if Redis forgot it (after a restart).

    A prelude's text goes in front: Lua scripts cannot import, and this keeps shared
    functions in one file.
    """
    source = resources.files(package).joinpath(filename).read_text()
    if prelude is not None:
        source = resources.files(prelude[0]).joinpath(prelude[1]).read_text() + "\n" + source
    return redis.register_script(source)
