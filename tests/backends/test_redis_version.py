"""redis-py is the major version server/backends/autopipeline.py was written against: it takes over
a connection's internals, which a new major may rename or rework without notice. Another major
fails here, by name, before it fails in a spike."""

from __future__ import annotations

import inspect

import redis
from redis._parsers import BaseParser
from redis.asyncio import BlockingConnectionPool
from redis.asyncio.connection import AbstractConnection

from server.backends.redis_link import REDIS_MAJOR


def test_redis_py_is_the_major_the_auto_pipeline_was_checked_against() -> None:
    major = int(redis.__version__.split(".")[0])
    assert major == REDIS_MAJOR, (
        f"redis-py {redis.__version__} is installed; server/backends/autopipeline.py drives redis-py "
        f"{REDIS_MAJOR}'s connection internals (make_connection, connect, retry, encoder, _reader/_writer, "
        "BaseParser.parse_error): check them against this version, then change REDIS_MAJOR and the range in "
        "pyproject.toml")


def test_the_internals_the_auto_pipeline_uses_are_there() -> None:
    assert callable(getattr(BlockingConnectionPool, "make_connection", None))
    assert callable(getattr(BaseParser, "parse_error", None))
    source = inspect.getsource(AbstractConnection.__init__)
    for attribute in ("self._reader", "self._writer", "self.retry", "self.encoder"):
        assert attribute in source, f"redis-py's AbstractConnection no longer sets {attribute}"
    assert inspect.iscoroutinefunction(AbstractConnection.connect)
