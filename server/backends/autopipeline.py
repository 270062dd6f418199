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
connection or a timeout is sent again on a new connection (twice at most, after a
short pause), which is safe because every script we send is idempotent on stock and
orders (a re-sent reserve that is refused again spends once more from the buyer's
rate limits).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import hiredis
from redis.asyncio.cluster import RedisCluster
from redis.commands.core import AsyncScript
from redis.exceptions import AskError, ClusterDownError, MovedError, NoScriptError, TryAgainError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from server.backends.redis_client import RETRIES, SOCKET_TIMEOUT_S, RedisClient, backoff
from server.backends.redis_link import REPLICA_WAIT_MS, Link, open_link
from server.backends.redis_nodes import Nodes


class NotReplicated(RedisTimeoutError):
    """The script ran on the master, but its replicas did not confirm its writes in time: the
    caller hears 503, and a retry (the same Idempotency-Key) finds what the script did."""


class _Call:
    """One script call on its way: where it goes (its first key's node), and how often it was
    sent again."""
    __slots__ = ("script", "packed", "fut", "key", "failures", "redirects")

    def __init__(self, script: AsyncScript, packed: bytes, fut: asyncio.Future[Any], key: bytes | str | None) -> None:
        self.script, self.packed, self.fut, self.key = script, packed, fut, key
        self.failures = 0   # whole batches lost with it (a dropped connection, a timeout)
        self.redirects = 0  # MOVED, ASK, TRYAGAIN, CLUSTERDOWN, NOSCRIPT: it ran nowhere


# Sent again after that many lost batches (the shared client's retry policy), or that many
# redirections: a slot that keeps moving or stays half-migrated fails the call (503), never hangs it.
MAX_FAILURES = RETRIES
MAX_REDIRECTS = 6
_backoff = backoff()
_ASKING = hiredis.pack_command(("ASKING",))


class AutoPipeline:
    """Batches per node: on a cluster each master gets its own connection and its own batches, and
    a call goes to the master of its first key's slot (every key of one of our scripts shares a
    hash tag). A MOVED reply re-reads the slots and sends the call to the new owner; ASK sends it
    once to the importing node; TRYAGAIN (the slot is half-migrated) and CLUSTERDOWN send it again
    after a pause. None of these ran the script, so sending again is safe."""

    # A batch runs in Redis as one block of work (a reserve is ~40 µs of engine time), during
    # which its other clients wait: 64 keeps that under ~3 ms.
    def __init__(self, redis: RedisClient, max_batch: int = 64, *, replica_acks: int = 0) -> None:
        self._redis = redis
        # With replica_acks, each batch ends with WAIT: its calls are answered once that many
        # replicas (at most those the node has, as it said when the link opened) have their
        # writes, or fail (the writes stand; a retry finds them) if that takes longer than
        # REPLICA_WAIT_MS. One WAIT per batch, not per call. A master left with fewer replicas
        # (its replica was promoted elsewhere, or died) is waited for less from its next link on.
        self._replica_acks = replica_acks
        self._nodes = Nodes(redis)
        self._max_batch = max_batch
        self._pending: dict[str, list[_Call]] = {}  # node -> calls of this turn
        self._flush_due = False
        self._sending: set[asyncio.Task[None]] = set()  # strong references until done
        self._links: dict[str, Link] = {}
        self._connecting: dict[str, asyncio.Future[Link]] = {}  # one attempt per node, shared by its batches
        self._closed = False

    async def script(self, script: AsyncScript, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        """Run a registered script (by SHA; loaded again if Redis forgot it, after a restart)."""
        packed = hiredis.pack_command(("EVALSHA", script.sha, len(keys), *keys, *args))  # bad args fail here
        if not self._nodes.known:
            await self._nodes.learn()
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queue(_Call(script, packed, fut, keys[0] if keys else None))
        return await fut

    def close(self) -> None:
        """Close the connections: calls in flight are cancelled, later ones fail."""
        self._closed = True
        for task in self._sending:
            task.cancel()
        pending, self._pending = self._pending, {}
        for calls in pending.values():
            _fail(calls, asyncio.CancelledError())
        links, self._links = self._links, {}
        for link in links.values():
            link.close(RedisConnectionError("the auto-pipeline is closed"))

    def _queue(self, call: _Call) -> None:
        if self._closed:
            _fail([call], RedisConnectionError("the auto-pipeline is closed"))
            return
        try:
            node = self._nodes.of(call.key) if call.key is not None else self._nodes.masters()[0]
        except Exception as exc:  # no node serves the slot now
            _fail([call], exc)
            return
        if not self._flush_due:
            self._flush_due = True
            asyncio.get_running_loop().call_soon(self._flush)
        batch = self._pending.setdefault(node, [])
        batch.append(call)
        if len(batch) >= self._max_batch:
            self._start(node, self._pending.pop(node))

    def _flush(self) -> None:
        self._flush_due = False
        pending, self._pending = self._pending, {}
        for node, batch in pending.items():
            self._start(node, batch)

    def _start(self, node: str, batch: list[_Call], *, asking: bool = False) -> None:
        task = asyncio.create_task(self._send(node, batch, asking), name="redis-autopipeline")
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)
        # A task cancelled before its first step never runs its own handlers.
        task.add_done_callback(lambda t: _fail(batch, asyncio.CancelledError()) if t.cancelled() else None)

    async def _send(self, node: str, batch: list[_Call], asking: bool) -> None:
        """Send a batch to a node and settle each call with its answer; what must go again (a
        lost batch, a redirection, an unknown script) goes again, up to its limits."""
        packed = b"".join(_ASKING + c.packed for c in batch) if asking else b"".join(c.packed for c in batch)
        n = len(batch) * (2 if asking else 1)
        try:
            link = await self._connect(node)
            wait, acks_wanted = link.wait, link.acks
            replies = await self._round_trip(link, packed + wait, n + 1 if wait else n)
        except (RedisConnectionError, RedisTimeoutError) as exc:
            await self._lost(batch, exc)
            return
        except BaseException as exc:  # every caller must hear of it, even on cancellation
            _fail(batch, exc)
            if not isinstance(exc, Exception):
                raise
            return
        unreplicated: Exception | None = None
        if wait:
            acks, replies = replies[-1], replies[:-1]
            if not isinstance(acks, int) or acks < acks_wanted:
                unreplicated = NotReplicated(f"{node}: {acks!r} of {acks_wanted} replicas had the writes "
                                             f"after {REPLICA_WAIT_MS} ms")
                link.close(unreplicated)  # the next link asks the node again how many it has
        again: list[_Call] = []
        unknown: list[_Call] = []
        moved = False
        for call, result in zip(batch, replies[1::2] if asking else replies):
            if call.fut.done():  # the caller was cancelled; the script ran all the same
                continue
            if not isinstance(result, Exception):
                if unreplicated is None:
                    call.fut.set_result(result)
                else:
                    call.fut.set_exception(unreplicated)
            elif call.redirects >= MAX_REDIRECTS or not isinstance(result, _REDIRECTIONS):
                call.fut.set_exception(result)
            elif isinstance(result, NoScriptError):
                unknown.append(call)
            elif isinstance(result, AskError) and not isinstance(result, MovedError):
                call.redirects += 1  # this call only, to the importing node, and only once
                self._start(f"{result.host}:{result.port}", [call], asking=True)
            else:
                moved = moved or isinstance(result, MovedError)
                again.append(call)
        if unknown:
            await self._load(node, unknown)
            await self._requeue(unknown, refresh=False, pause=False)
        if again:
            await self._requeue(again, refresh=moved, pause=not moved)

    async def _load(self, node: str, calls: list[_Call]) -> None:
        """A restarted Redis (a failed-over master) has no scripts: load them on that node (a
        refused EVALSHA ran nothing)."""
        try:
            for script in {id(c.script): c.script for c in calls}.values():
                if isinstance(self._redis, RedisCluster):
                    target = self._redis.get_node(node_name=node)
                    await self._redis.execute_command("SCRIPT LOAD", script.script, target_nodes=target)
                else:
                    await self._redis.script_load(script.script)
        except BaseException as exc:
            _fail(calls, exc)
            calls.clear()
            if not isinstance(exc, Exception):
                raise

    async def _lost(self, batch: list[_Call], exc: Exception) -> None:
        """The batch's connection failed or timed out: send again on a new connection, after a
        pause and, on a cluster, a fresh look at the slots (the master may have failed over)."""
        live = [c for c in batch if not c.fut.done()]
        for call in live:
            call.failures += 1
        _fail([c for c in live if c.failures > MAX_FAILURES or self._closed], exc)
        live = [c for c in live if not c.fut.done()]
        if live:
            await asyncio.sleep(_backoff.compute(max(c.failures for c in live)))
            await self._requeue(live, refresh=self._nodes.cluster, pause=False, redirected=False)

    async def _requeue(self, calls: list[_Call], *, refresh: bool, pause: bool, redirected: bool = True) -> None:
        if redirected:
            for call in calls:
                call.redirects += 1
        if pause:  # a half-migrated slot, a cluster electing a master: give it a moment
            await asyncio.sleep(_backoff.compute(max(c.redirects for c in calls)))
        if refresh:
            try:
                await self._nodes.refresh()
            except Exception as exc:  # the cluster cannot be read now: the calls fail (503)
                _fail(calls, exc)
                return
        for call in calls:
            if not call.fut.done():
                self._queue(call)

    async def _round_trip(self, link: Link, packed: bytes, n: int) -> list[Any]:
        answer = link.round_trip(packed, n)
        try:
            async with asyncio.timeout(SOCKET_TIMEOUT_S):
                return await answer
        except TimeoutError:
            # The replies would come back out of step: give up on this connection.
            error = RedisTimeoutError(f"no answer from Redis in {SOCKET_TIMEOUT_S:.0f}s")
            link.close(error)
            raise error from None

    async def _connect(self, node: str) -> Link:
        """The node's link, connecting if needed. Batches that find a connection attempt under way
        wait for that one (and share its failure): a dead node costs one attempt, not one per batch."""
        if self._closed:
            raise RedisConnectionError("the auto-pipeline is closed")
        link = self._links.get(node)
        if link is not None and link.error is None:
            return link
        attempt = self._connecting.get(node)
        if attempt is None:
            attempt = self._connecting[node] = asyncio.ensure_future(self._open(node))
            attempt.add_done_callback(lambda done: self._connected(node, done))
        return await asyncio.shield(attempt)  # a cancelled batch leaves it to the others

    def _connected(self, node: str, attempt: asyncio.Future[Link]) -> None:
        self._connecting.pop(node, None)
        if not attempt.cancelled() and attempt.exception() is None:
            self._links[node] = attempt.result()

    async def _open(self, node: str) -> Link:
        link = await open_link(self._nodes.connection(node), replica_acks=self._replica_acks)
        if self._closed:  # closed while this connected
            link.close(RedisConnectionError("the auto-pipeline is closed"))
            raise link.error or RedisConnectionError("closed")
        return link


# Replies that mean "not run here, send it again" (MovedError is an AskError).
_REDIRECTIONS = (NoScriptError, AskError, TryAgainError, ClusterDownError)


def _fail(calls: list[_Call], exc: BaseException) -> None:
    for call in calls:
        fut = call.fut
        if fut.done():
            continue
        if isinstance(exc, asyncio.CancelledError):
            fut.cancel()
        else:
            fut.set_exception(exc)
