"""One connection of the auto-pipeline's to one Redis node, read in C: batches go out in order and
each batch's future gets its n replies, parsed by hiredis as their bytes arrive. Opened by
redis-py (address, TLS, AUTH, SELECT, as the pool's connections), then taken over."""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any, cast

import hiredis
from redis._parsers import BaseParser
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import InvalidResponse

from server.backends.redis_client import SOCKET_TIMEOUT_S

# redis-py's internals this module relies on, checked against each new major before the range in
# pyproject.toml admits it (tests/backends/test_redis_version.py): a pool's make_connection(), a
# connection's connect(), retry, encoder and its asyncio streams `_reader` and `_writer`, which
# this module takes over; BaseParser.parse_error, which makes an error reply redis-py's exception.
REDIS_MAJOR = 8

CLIENT_NAME = "livesale-autopipeline"
REPLICA_WAIT_MS = 1000  # how long a batch waits for its replicas (replica_acks), then fails (503)
_SETNAME = hiredis.pack_command(("CLIENT", "SETNAME", CLIENT_NAME))  # type: ignore[arg-type]  # the stub's tuple type is too narrow


class Link(asyncio.Protocol):
    """One connection carrying batches in order: each batch's future gets its n replies."""

    def __init__(self, writer: asyncio.StreamWriter, decode: str | None) -> None:
        self._writer = writer  # kept: the stream that opened the socket must not be collected
        options: dict[str, Any] = {"protocolError": InvalidResponse, "replyError": BaseParser.parse_error}
        if decode:
            options["encoding"] = decode
        self._reader = hiredis.Reader(**options)
        self._waiting: deque[tuple[int, list[Any], asyncio.Future[list[Any]]]] = deque()
        self._transport: asyncio.Transport | None = None
        self.error: Exception | None = None  # why the link is closed, once it is
        self.wait = b""  # the WAIT that ends each batch on this link (none: b"")
        self.acks = 0    # ... for this many replicas

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses

    def data_received(self, data: bytes) -> None:
        try:
            self._reader.feed(data)
            while (reply := self._reader.gets()) is not False:
                n, replies, done = self._waiting[0]
                replies.append(reply)
                if len(replies) == n:
                    self._waiting.popleft()
                    if not done.done():  # its caller timed out
                        done.set_result(replies)
        except (InvalidResponse, IndexError) as exc:  # garbage, or a reply nobody asked for
            self.close(RedisConnectionError(f"unreadable reply from Redis: {exc!r}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.close(RedisConnectionError(f"connection to Redis lost: {exc or 'closed by the server'}"))

    def round_trip(self, packed: bytes, n: int) -> asyncio.Future[list[Any]]:
        done: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        if self.error is not None or self._transport is None:
            done.set_exception(self.error or RedisConnectionError("not connected"))
            return done
        self._waiting.append((n, [], done))
        self._transport.write(packed)
        return done

    def close(self, error: Exception) -> None:
        """Close the link; every batch still waiting fails with `error` (and is sent again)."""
        if self.error is None:
            self.error = error
        if self._transport is not None:
            self._transport.abort()
        while self._waiting:
            _, _, done = self._waiting.popleft()
            if not done.done():
                done.set_exception(self.error)




async def open_link(conn: AbstractConnection, *, replica_acks: int = 0) -> Link:
    """Connect `conn` and hand its socket to a link. With replica_acks, the link's batches are to
    end with a WAIT for that many replicas, at most those the node has now."""
    await conn.connect()  # type: ignore[no-untyped-call]
    writer: asyncio.StreamWriter | None = getattr(conn, "_writer", None)
    if writer is None:
        raise RedisConnectionError("redis-py connected without a stream writer")
    # From here the socket is the link's: redis-py's object lets go of its streams.
    conn._reader = conn._writer = None
    link = Link(writer, conn.encoder.encoding if conn.encoder.decode_responses else None)
    transport = writer.transport
    link.connection_made(transport)
    transport.set_protocol(link)
    try:
        async with asyncio.timeout(SOCKET_TIMEOUT_S):
            await link.round_trip(_SETNAME, 1)  # named, so that CLIENT LIST tells it from the pool's
            if replica_acks:
                info = (await link.round_trip(_REPLICATION, 1))[0]
                link.acks = min(replica_acks, _connected_replicas(info))
                if link.acks:
                    link.wait = hiredis.pack_command(("WAIT", link.acks, REPLICA_WAIT_MS))  # type: ignore[arg-type]
    except BaseException as exc:
        link.close(RedisConnectionError(f"connection setup failed: {exc!r}"))
        raise
    return link


_REPLICATION = hiredis.pack_command(("INFO", "replication"))  # type: ignore[arg-type]


def _connected_replicas(info: bytes | str) -> int:
    for line in (info.decode() if isinstance(info, bytes) else info).splitlines():
        if line.startswith("connected_slaves:"):
            return int(line.partition(":")[2])
    return 0
