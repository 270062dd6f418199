"""One Redis node's pub/sub connection for the broker (server/rooms/broker.py): the channels of
the wanted rooms that node serves, and the sessions channel if it serves that. Its task alone
reads it and changes its subscriptions; it tells the broker what Redis confirmed, and fails the
whole (the broker reconnects every link) when the connection drops or the node gives a channel
away."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from typing import Collection, Protocol

from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from server.backends import redis_client
from server.backends.loops import running
from server.rooms import keys

log = logging.getLogger("livesale.rooms.broker")

# The revoked sessions are read again this often while subscribed: a logout whose message was
# lost (its publish failed, or a half-open link) is then seen within this long anyway.
SESSIONS_RESYNC_S = 10.0


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


class Owner(Protocol):
    """What a link asks and tells its broker."""
    sharded: bool

    def owned(self, node: str) -> set[str]:
        """The wanted rooms whose channels `node` serves."""
        ...
    def wants(self, room_id: str) -> bool: ...
    def subscribed(self, room_id: str) -> None:
        """The room's events reach this process now."""
        ...
    def unsubscribed(self, room_ids: set[str]) -> None: ...
    def failed(self, exc: BaseException) -> None:
        """This link is gone: reconnect them all."""
        ...


class NodeLink:
    """One node's pub/sub connection, used by its task alone (subscription changes included)."""

    def __init__(self, broker: Owner, node: str, client: Redis, sessions: SessionFeed, *,
                 carries_sessions: bool) -> None:
        self._broker = broker
        self.node = node
        self._client = client
        self._sessions = sessions
        self.carries_sessions = carries_sessions
        self._sessions_due: float | None = None  # when to (re)load the revoked sessions
        self._active: set[str] = set()
        self._unsubscribing: Counter[str] = Counter()  # rooms whose unsubscribe Redis has yet to confirm
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
            self._broker.failed(exc)
        finally:
            if self.carries_sessions:
                self._sessions.lost()
            with contextlib.suppress(Exception):
                await pubsub.aclose()

    async def _subscribe(self, pubsub: PubSub, *channels: str) -> None:
        if not self._broker.sharded:
            await pubsub.subscribe(*channels)
            return
        # One SSUBSCRIBE per channel: a cluster refuses one naming channels of several slots
        # (CROSSSLOT), and the rooms' channels are each in a slot of their own.
        for channel in channels:
            await pubsub.ssubscribe(channel)

    async def _unsubscribe(self, pubsub: PubSub, *channels: str) -> None:
        if not self._broker.sharded:
            await pubsub.unsubscribe(*channels)
            return
        for channel in channels:
            await pubsub.sunsubscribe(channel)

    async def _sync(self, pubsub: PubSub) -> None:
        self.changed.clear()
        wanted = self._broker.owned(self.node)  # a change made during the awaits below sets `changed`: the next sync's
        added, dropped = wanted - self._active, self._active - wanted
        if added:
            await self._subscribe(pubsub, *(keys.channel(r) for r in added))
        if dropped:
            await self._unsubscribe(pubsub, *(keys.channel(r) for r in dropped))
            self._unsubscribing.update(dropped)  # confirmations to come: these were asked for
            self._broker.unsubscribed(dropped)
        self._active = wanted
        # Rooms subscribed before are ready now; the added ones once Redis confirms each.
        for room_id in wanted - added:
            self._broker.subscribed(room_id)

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
                    self._broker.subscribed(room_id)
            elif kind == "sunsubscribe":
                if self._unsubscribing[room_id] > 0:
                    self._unsubscribing[room_id] -= 1
                    if not self._unsubscribing[room_id]:
                        del self._unsubscribing[room_id]
                elif room_id in self._active:
                    # Not asked for: the node gave the channel's slot away (a reshard, a failover).
                    raise TopologyChanged(f"{self.node} no longer serves {channel}")
