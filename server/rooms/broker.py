"""Receiving room events from every process, through Redis pub/sub (the publishing side is
server/rooms/publisher.py; a message's format, server/rooms/protocol.py).

Each web process subscribes to the channels of the rooms that have viewers in it (sharded
pub/sub, SSUBSCRIBE, when the server has it), with one pub/sub connection per Redis node that
owns some of those channels: one for a plain Redis, up to one per master of a cluster. It hands
each message to its listener, the hub. All subscription changes of a connection are made by the
task reading it, so each connection is only ever used by one task. If a node goes away or
gives a channel's slot to another, it reconnects with backoff, resubscribes where the channels
live now, and has the listener resync its viewers (events published meanwhile are lost: pub/sub
does not queue).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from typing import Any, Collection, Protocol

from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from server.backends import redis_client
from server.backends.loops import running
from server.backends.redis_nodes import Nodes
from server.rooms import keys

log = logging.getLogger("livesale.rooms.broker")

# The revoked sessions are read again this often while subscribed: a logout whose message was
# lost (its publish failed, or a half-open link) is then seen within this long anyway.
SESSIONS_RESYNC_S = 10.0
# The longest wait between reconnects: every room in this process is silent until the link is
# back, and a refused connect costs next to nothing.
RECONNECT_MAX_S = 1.0



class Listener(Protocol):
    """Who the broker hands what it receives (server.rooms.hub.Hub)."""

    def on_message(self, room_id: str, data: bytes) -> None:
        """A message published on a subscribed room's channel."""
        ...

    async def resync(self) -> None:
        """The link was lost and is back: events published meanwhile were lost."""
        ...

    def end_sessions(self, session_ids: Collection[str]) -> None:
        """These sessions logged out: close their sockets."""
        ...


class SessionFeed(Protocol):
    """Who follows the sessions channel (server.auth.Sessions): told when the channel is
    subscribed (so nothing published from then on is missed), of each logout, and when the
    link is lost."""

    async def sync(self) -> Collection[str]:
        """Load every revocation; return the sessions it did not know of (their messages were missed)."""
        ...
    def revoked(self, session_id: str) -> None: ...
    def lost(self) -> None: ...


class TopologyChanged(Exception):
    """A node stopped serving a channel this process listens on (its slot moved, or a failover
    made another node its master): reconnect to the channels' current owners."""


class Broker:
    """Every node that owns the channel of a room with viewers here (and the node owning the
    sessions channel) gets one pub/sub link of its own, each run by its own task. The links are
    one whole: when any fails, or a node says a channel moved away, all are reconnected (after the
    slots are read again) and the listener resyncs, as after any outage."""

    def __init__(self, nodes: Nodes, sessions: SessionFeed, *, sharded: bool) -> None:
        self._nodes = nodes
        self._sessions = sessions
        self.sharded = sharded
        self._wanted: set[str] = set()        # rooms that should be subscribed
        self._active: set[str] = set()        # rooms subscribed on the current links
        self._waiters: dict[str, list[asyncio.Future[None]]] = {}
        self._changed = asyncio.Event()
        self._connected = asyncio.Event()
        self._links: dict[str, _NodeLink] = {}
        self._failed: asyncio.Future[None] | None = None  # the current links' first failure

    def is_connected(self) -> bool:
        """Whether the links are up and subscribed: the rooms' events reach this process."""
        return self._connected.is_set()

    async def subscribe(self, room_id: str) -> None:
        """Return once this process receives the room's events."""
        if room_id in self._active and room_id in self._wanted:
            return
        self._wanted.add(room_id)
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        waiters = self._waiters.setdefault(room_id, [])
        waiters.append(fut)
        self._changed.set()
        try:
            await fut
        finally:  # released, or the joiner gave up: forget its future
            with contextlib.suppress(ValueError):
                waiters.remove(fut)
            if not waiters and self._waiters.get(room_id) is waiters:
                del self._waiters[room_id]

    def unsubscribe(self, room_id: str) -> None:
        self._wanted.discard(room_id)
        self._changed.set()

    async def run(self, listener: Listener) -> None:
        """Receive for `listener` until cancelled."""
        backoff = 0.1
        first = True
        while running():
            self._failed = asyncio.get_running_loop().create_future()
            try:
                self._active.clear()
                self._changed.clear()
                self._place(listener)
                await self._ready()
                self._connected.set()
                if not first:
                    log.warning("pub/sub reconnected; resubscribing to %d rooms", len(self._wanted))
                    await listener.resync()
                first = False
                backoff = 0.1
                while running():
                    changed = asyncio.ensure_future(self._changed.wait())
                    try:
                        await asyncio.wait((changed, self._failed), return_when=asyncio.FIRST_COMPLETED)
                    finally:
                        changed.cancel()
                    if self._failed.done():
                        self._failed.result()  # raises what ended a link
                    self._changed.clear()
                    self._place(listener)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # whatever ended the links, the listener must go on
                self._connected.clear()
                self._sessions.lost()  # now, not after the backoff
                if isinstance(exc, (RedisConnectionError, RedisTimeoutError, OSError, TopologyChanged)):
                    log.warning("pub/sub connection lost (%r); retrying in %.1fs", exc, backoff)
                else:
                    log.exception("pub/sub listener failed; reconnecting in %.1fs", backoff)
                await self._close_links()
                if self._nodes.cluster:
                    with contextlib.suppress(Exception):  # the next attempt tells if it still fails
                        await self._nodes.refresh()
                await asyncio.sleep(backoff * (0.5 + random.random()))
                backoff = min(backoff * 2, RECONNECT_MAX_S)
            finally:
                self._connected.clear()
                self._sessions.lost()  # however the links ended
                await self._close_links()
                if self._failed.done():
                    self._failed.exception()  # seen (else asyncio logs it as never retrieved)

    def _place(self, listener: Listener) -> None:
        """Start a link for every node that owns a wanted channel (each link keeps its own
        subscriptions to what it owns), and tell the running ones to sync."""
        owners = {self._nodes.of(keys.SESSIONS_CHANNEL)} | {self._nodes.of(keys.channel(r)) for r in self._wanted}
        for node in owners - self._links.keys():
            link = self._links[node] = _NodeLink(self, node, self._nodes.listener(node))
            link.start(listener)
        for link in self._links.values():
            link.changed.set()

    async def _ready(self) -> None:
        """Until every link has subscribed once (or one failed)."""
        assert self._failed is not None
        waits: set[asyncio.Future[Any]] = {asyncio.ensure_future(link.ready.wait()) for link in self._links.values()}
        try:
            while waits:
                _, waits = await asyncio.wait({*waits, self._failed}, return_when=asyncio.FIRST_COMPLETED)
                if self._failed.done():
                    self._failed.result()
                waits.discard(self._failed)
        finally:
            for fut in waits:
                fut.cancel()

    def _fail(self, exc: BaseException) -> None:
        if self._failed is not None and not self._failed.done():
            self._failed.set_exception(exc)

    async def _close_links(self) -> None:
        links, self._links = list(self._links.values()), {}
        for link in links:
            await link.stop()
        self._active.clear()

    def _owned(self, node: str) -> set[str]:
        return {r for r in self._wanted if self._nodes.of(keys.channel(r)) == node}

    def _release_waiters(self, room_id: str | None = None) -> None:
        for rid in [room_id] if room_id is not None else list(self._waiters):
            if rid in self._active:
                for fut in self._waiters.pop(rid, []):
                    if not fut.done():
                        fut.set_result(None)


class _NodeLink:
    """One node's pub/sub connection, used by its task alone (subscription changes included)."""

    def __init__(self, broker: Broker, node: str, client: Redis) -> None:
        self._broker = broker
        self.node = node
        self._client = client
        self._sessions = broker._sessions
        self.carries_sessions = broker._nodes.of(keys.SESSIONS_CHANNEL) == node
        self._sessions_due: float | None = None  # when to (re)load the revoked sessions
        self._active: set[str] = set()
        self.changed = asyncio.Event()
        self.ready = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self, listener: Listener) -> None:
        self._task = asyncio.create_task(self._run(listener), name=f"pubsub-{self.node}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        with contextlib.suppress(Exception):  # the connection may be broken already
            await redis_client.close(self._client)

    async def _run(self, listener: Listener) -> None:
        pubsub = self._client.pubsub()
        try:
            if self.carries_sessions:
                await self._subscribe(pubsub, keys.SESSIONS_CHANNEL)
            await self._sync(pubsub)
            self.ready.set()
            await self._listen(pubsub, listener)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            self._broker._fail(exc)
        finally:
            if self.carries_sessions:
                self._sessions.lost()
            with contextlib.suppress(Exception):
                await pubsub.aclose()

    async def _subscribe(self, pubsub: PubSub, *channels: str) -> None:
        await (pubsub.ssubscribe(*channels) if self._broker.sharded else pubsub.subscribe(*channels))

    async def _sync(self, pubsub: PubSub) -> None:
        self.changed.clear()
        wanted = self._broker._owned(self.node)  # a change made during the awaits below sets `changed`: the next sync's
        added, dropped = wanted - self._active, self._active - wanted
        if added:
            await self._subscribe(pubsub, *(keys.channel(r) for r in added))
        if dropped:
            drop = [keys.channel(r) for r in dropped]
            await (pubsub.sunsubscribe(*drop) if self._broker.sharded else pubsub.unsubscribe(*drop))
            self._broker._active -= dropped
        self._active = wanted
        # Rooms subscribed before are ready now; the added ones once Redis confirms each.
        for room_id in wanted - added:
            self._broker._active.add(room_id)
            self._broker._release_waiters(room_id)

    async def _sync_sessions(self, listener: Listener) -> None:
        loop = asyncio.get_running_loop()
        try:
            missed = await self._sessions.sync()
            self._sessions_due = loop.time() + SESSIONS_RESYNC_S
            if missed:  # logouts whose message never came: close their sockets now
                listener.end_sessions(missed)
        except (RedisConnectionError, RedisTimeoutError, ResponseError, OSError) as exc:
            # Not the pub/sub link's fault (the read uses the shared pool): keep the link, let
            # requests ask Redis meanwhile, and try again soon.
            self._sessions.lost()
            self._sessions_due = loop.time() + 1.0
            log.warning("could not load the revoked sessions (%r); asking Redis per request meanwhile", exc)

    async def _listen(self, pubsub: PubSub, listener: Listener) -> None:
        self._sessions_due = None  # until the sessions channel is confirmed on this link
        while running():
            if self.changed.is_set():
                await self._sync(pubsub)
            if self._sessions_due is not None and asyncio.get_running_loop().time() >= self._sessions_due:
                await self._sync_sessions(listener)
            msg = await pubsub.get_message(timeout=0.05)
            if msg is None:
                continue
            kind = msg["type"]
            channel = msg["channel"].decode() if isinstance(msg["channel"], bytes) else str(msg["channel"])
            if channel == keys.SESSIONS_CHANNEL:
                if kind in ("message", "smessage"):
                    session_id = msg["data"].decode()
                    self._sessions.revoked(session_id)
                    listener.end_sessions((session_id,))
                elif kind in ("subscribe", "ssubscribe"):
                    await self._sync_sessions(listener)
                elif kind == "sunsubscribe":
                    raise TopologyChanged(f"{self.node} no longer serves the sessions channel")
                continue
            room_id = keys.room_id_of(channel)
            if kind in ("message", "smessage"):
                listener.on_message(room_id, msg["data"])
            elif kind in ("subscribe", "ssubscribe"):
                if room_id in self._active:
                    self._broker._active.add(room_id)
                    self._broker._release_waiters(room_id)
            elif kind == "sunsubscribe" and room_id in self._active and room_id in self._broker._wanted:
                # Not asked for: the node gave the channel's slot away (a reshard, a failover).
                raise TopologyChanged(f"{self.node} no longer serves {channel}")
