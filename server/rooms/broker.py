"""Receiving room events from every process, through Redis pub/sub (the publishing side is
server/rooms/publisher.py; a message's format, server/rooms/protocol.py).

One listener task per web process holds one pub/sub connection, subscribed to the
channels of the rooms that have viewers in this process (sharded pub/sub,
SSUBSCRIBE, when the server has it). It hands each message to its listener, the hub.
All subscription changes are made by the listener task itself, so the pub/sub
connection is only ever used by one task. If Redis goes away, it reconnects with
backoff, resubscribes, and has the listener resync its viewers (events published
meanwhile are lost: pub/sub does not queue).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from typing import Collection, Protocol

from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from server.backends.loops import running
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


class Broker:
    def __init__(self, listen: Redis, sessions: SessionFeed, *, sharded: bool) -> None:
        # A client that never retries, so a dropped link always reaches run(), which
        # resubscribes and has the hub resend `welcome` (redis-py would otherwise reconnect
        # inside get_message and the events published meanwhile would vanish unseen).
        self._listen_client = listen
        self._sessions = sessions
        self._sessions_due: float | None = None  # when to (re)load the revoked sessions
        self.sharded = sharded
        self._wanted: set[str] = set()        # rooms that should be subscribed
        self._active: set[str] = set()        # rooms subscribed on the current connection
        self._waiters: dict[str, list[asyncio.Future[None]]] = {}
        self._changed = asyncio.Event()
        self._connected = asyncio.Event()

    def is_connected(self) -> bool:
        """Whether the link is up and subscribed: the rooms' events reach this process."""
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
            pubsub = self._listen_client.pubsub()
            try:
                self._active.clear()
                await (pubsub.ssubscribe(keys.SESSIONS_CHANNEL) if self.sharded else pubsub.subscribe(keys.SESSIONS_CHANNEL))
                await self._sync(pubsub)
                self._connected.set()
                if not first:
                    log.warning("pub/sub reconnected; resubscribed to %d rooms", len(self._active))
                    await listener.resync()
                first = False
                backoff = 0.1
                await self._listen(pubsub, listener)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # whatever ended the link, the listener must go on
                self._connected.clear()
                self._sessions.lost()  # now, not after the backoff
                if isinstance(exc, (RedisConnectionError, RedisTimeoutError, OSError)):
                    log.warning("pub/sub connection lost (%r); retrying in %.1fs", exc, backoff)
                else:
                    log.exception("pub/sub listener failed; reconnecting in %.1fs", backoff)
                await asyncio.sleep(backoff * (0.5 + random.random()))
                backoff = min(backoff * 2, RECONNECT_MAX_S)
            finally:
                self._connected.clear()
                self._sessions.lost()  # however the link ended
                try:
                    await pubsub.aclose()
                except Exception:  # the connection is already broken; nothing to clean
                    pass

    async def _sync(self, pubsub: PubSub) -> None:
        self._changed.clear()
        wanted = set(self._wanted)  # a change made during the awaits below sets _changed: the next sync's
        added, dropped = wanted - self._active, self._active - wanted
        if added:
            add = [keys.channel(r) for r in added]
            await (pubsub.ssubscribe(*add) if self.sharded else pubsub.subscribe(*add))
        if dropped:
            drop = [keys.channel(r) for r in dropped]
            await (pubsub.sunsubscribe(*drop) if self.sharded else pubsub.unsubscribe(*drop))
        self._active = wanted
        # Rooms subscribed before are ready now; the added ones once Redis confirms each.
        for room_id in [r for r in self._waiters if r not in added]:
            self._release_waiters(room_id)

    def _release_waiters(self, room_id: str | None = None) -> None:
        for rid in [room_id] if room_id is not None else list(self._waiters):
            if rid in self._active:
                for fut in self._waiters.pop(rid, []):
                    if not fut.done():
                        fut.set_result(None)

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
            if self._changed.is_set():
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
                continue
            room_id = keys.room_id_of(channel)
            if kind in ("message", "smessage"):
                listener.on_message(room_id, msg["data"])
            elif kind in ("subscribe", "ssubscribe"):
                self._release_waiters(room_id)
