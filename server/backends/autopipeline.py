"""Automatic pipelining: script calls made in one event-loop turn go to Redis as one pipeline,
on one connection of their own, read in C.

Under a purchase spike hundreds of requests each run one script. Sent one by one,
each pays redis-py's whole per-command cost (a pool checkout, a timeout, a socket
write, a wake-up, an awaited read): ~150 µs of CPU per call, more than the rest of the
request. Here the calls of a turn share one write; the replies are parsed by hiredis
as their bytes arrive (`data_received`), with no await per reply, and each batch's
caller is woken once. Nothing waits for a batch to fill: the first call of a turn
schedules the flush for the end of that turn, so a lone call goes out at once.

Redis answers a connection's commands in order, so batches need not wait for each
other either: they queue on the link and each takes the next replies.

Every call still gets its own answer or its own error. A batch cut off by a dropped
connection or a timeout is sent again on a new connection (with redis-py's retry
policy), which is safe because every script we send is idempotent on stock and
orders (a re-sent reserve that is refused again spends once more from the buyer's
rate limits).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Sequence
from typing import Any, cast

import hiredis
from redis._parsers import BaseParser
from redis.asyncio import Redis
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import InvalidResponse, NoScriptError
from redis.exceptions import TimeoutError as RedisTimeoutError

from server.backends.redis_client import SOCKET_TIMEOUT_S, make_retry

# redis-py's internals this module relies on, checked against each new major before the range in
# pyproject.toml admits it (tests/backends/test_redis_version.py): a pool's make_connection(), a
# connection's connect(), retry, encoder and its asyncio streams `_reader` and `_writer`, which
# this module takes over; BaseParser.parse_error, which makes an error reply redis-py's exception.
REDIS_MAJOR = 8

Call = tuple[AsyncScript, bytes, "asyncio.Future[Any]"]  # the script, its EVALSHA packed, the answer
CLIENT_NAME = "livesale-autopipeline"
_SETNAME = hiredis.pack_command(("CLIENT", "SETNAME", CLIENT_NAME))  # type: ignore[arg-type]  # the stub's tuple type is too narrow


class _Link(asyncio.Protocol):
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


class AutoPipeline:
    # A batch runs in Redis as one block of work (a reserve is ~40 µs of engine time), during
    # which its other clients wait: 64 keeps that under ~3 ms.
    def __init__(self, redis: Redis, max_batch: int = 64) -> None:
        self._redis = redis
        self._max_batch = max_batch
        self._pending: list[Call] = []
        self._sending: set[asyncio.Task[None]] = set()  # strong references until done
        self._link: _Link | None = None
        self._connecting: asyncio.Future[_Link] | None = None  # one attempt, shared by every batch waiting
        self._closed = False
        self._retry = make_retry()

    async def script(self, script: AsyncScript, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        """Run a registered script (by SHA; loaded again if Redis forgot it, after a restart)."""
        packed = hiredis.pack_command(("EVALSHA", script.sha, len(keys), *keys, *args))  # bad args fail here
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        if not self._pending:
            loop.call_soon(self._flush)
        self._pending.append((script, packed, fut))
        if len(self._pending) >= self._max_batch:
            self._flush()
        return await fut

    def close(self) -> None:
        """Close the connection: calls in flight are cancelled, later ones fail."""
        self._closed = True
        for task in self._sending:
            task.cancel()
        link, self._link = self._link, None
        if link is not None:
            link.close(RedisConnectionError("the auto-pipeline is closed"))

    def _flush(self) -> None:
        batch, self._pending = self._pending, []
        if batch:
            task = asyncio.create_task(self._send(batch), name="redis-autopipeline")
            self._sending.add(task)
            task.add_done_callback(self._sending.discard)
            # A task cancelled before its first step never runs its own handlers.
            task.add_done_callback(lambda _: _fail(batch, asyncio.CancelledError()))

    async def _send(self, batch: list[Call]) -> None:
        if not await self._attempt(batch):
            return
        missing = [call for call in batch if not call[2].done()]
        if missing:
            # A restarted Redis has no scripts: load them and send again what it refused (a
            # refused EVALSHA ran nothing). The others already have their answers.
            try:
                for script in {id(c[0]): c[0] for c in missing}.values():
                    await self._redis.script_load(script.script)
            except BaseException as exc:
                _fail(missing, exc)
                if not isinstance(exc, Exception):
                    raise
                return
            await self._attempt(missing, reload=False)

    async def _attempt(self, batch: list[Call], reload: bool = True) -> bool:
        """Send a batch and settle each call with its answer; NOSCRIPT refusals are left
        pending when `reload`. False if the batch failed as a whole (every call told)."""
        packed = b"".join(command for _, command, _ in batch)
        try:
            results: list[Any] = await self._retry.call_with_retry(
                lambda: self._round_trip(packed, len(batch)), self._drop, lambda _: not self._closed)
        except BaseException as exc:  # every caller must hear of it, even on cancellation
            _fail(batch, exc)
            if not isinstance(exc, Exception):
                raise
            return False
        for (_, _, fut), result in zip(batch, results):
            if fut.done():  # the caller was cancelled; the script ran all the same
                continue
            if isinstance(result, NoScriptError) and reload:
                continue
            if isinstance(result, Exception):
                fut.set_exception(result)
            else:
                fut.set_result(result)
        return True

    async def _round_trip(self, packed: bytes, n: int) -> list[Any]:
        link = await self._connect()
        answer = link.round_trip(packed, n)
        try:
            async with asyncio.timeout(SOCKET_TIMEOUT_S):
                return await answer
        except TimeoutError:
            # The replies would come back out of step: give up on this connection.
            error = RedisTimeoutError(f"no answer from Redis in {SOCKET_TIMEOUT_S:.0f}s")
            link.close(error)
            raise error from None

    async def _drop(self, error: Exception) -> None:
        if self._link is not None and self._link.error is not None:
            self._link = None

    async def _connect(self) -> _Link:
        """The link, connecting if needed. Batches that find a connection attempt under way wait
        for that one (and share its failure): a dead Redis costs one attempt, not one per batch."""
        if self._closed:
            raise RedisConnectionError("the auto-pipeline is closed")
        if self._link is not None and self._link.error is None:
            return self._link
        if self._connecting is None:
            self._connecting = asyncio.ensure_future(self._open())
            self._connecting.add_done_callback(self._connected)
        return await asyncio.shield(self._connecting)  # a cancelled batch leaves it to the others

    def _connected(self, attempt: asyncio.Future[_Link]) -> None:
        self._connecting = None
        if not attempt.cancelled() and attempt.exception() is None:
            self._link = attempt.result()

    async def _open(self) -> _Link:
        """A new connection, set up by redis-py (address, TLS, AUTH, SELECT, as for the pool's
        connections), then handed to a link: its replies are read by the link only."""
        conn: AbstractConnection = self._redis.connection_pool.make_connection()  # type: ignore[no-untyped-call]
        conn.retry = Retry(NoBackoff(), 0)  # one try: the batches' own retry policy is the only one
        await conn.connect()  # type: ignore[no-untyped-call]
        writer: asyncio.StreamWriter | None = getattr(conn, "_writer", None)
        if writer is None:
            raise RedisConnectionError("redis-py connected without a stream writer")
        # From here the socket is the link's: redis-py's object lets go of its streams.
        conn._reader = conn._writer = None
        link = _Link(writer, conn.encoder.encoding if conn.encoder.decode_responses else None)
        transport = writer.transport
        link.connection_made(transport)
        transport.set_protocol(link)
        try:
            # Named, so that CLIENT LIST tells this connection from the pool's.
            async with asyncio.timeout(SOCKET_TIMEOUT_S):
                await link.round_trip(_SETNAME, 1)
            if self._closed:  # closed while this connected
                raise RedisConnectionError("the auto-pipeline is closed")
        except BaseException as exc:
            link.close(RedisConnectionError(f"connection setup failed: {exc!r}"))
            raise
        return link


def _fail(calls: list[Call], exc: BaseException) -> None:
    for _, _, fut in calls:
        if fut.done():
            continue
        if isinstance(exc, asyncio.CancelledError):
            fut.cancel()
        else:
            fut.set_exception(exc)
