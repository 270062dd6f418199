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
from typing import Any

from server.backends.loops import running
from server.backends.redis_client import REDIS_ERRORS
from server.backends.redis_nodes import Nodes
from server.rooms import keys
from server.rooms.node_link import Listener, NodeLink, SessionFeed, TopologyChanged

log = logging.getLogger("livesale.rooms.broker")

# The longest wait between reconnects: every room in this process is silent until the link is
# back, and a refused connect costs next to nothing.
RECONNECT_MAX_S = 1.0



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
        self._links: dict[str, NodeLink] = {}
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
                if isinstance(exc, (*REDIS_ERRORS, OSError, TopologyChanged)):  # a node away or moving
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
            link = self._links[node] = NodeLink(self, node, self._nodes.listener(node), self._sessions,
                                                carries_sessions=node == self._nodes.of(keys.SESSIONS_CHANNEL))
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

    def failed(self, exc: BaseException) -> None:
        if self._failed is not None and not self._failed.done():
            self._failed.set_exception(exc)

    async def _close_links(self) -> None:
        links, self._links = list(self._links.values()), {}
        for link in links:
            await link.stop()
        self._active.clear()

    def owned(self, node: str) -> set[str]:
        return {r for r in self._wanted if self._nodes.of(keys.channel(r)) == node}

    def wants(self, room_id: str) -> bool:
        return room_id in self._wanted

    def subscribed(self, room_id: str) -> None:
        self._active.add(room_id)
        self._release_waiters(room_id)

    def unsubscribed(self, room_ids: set[str]) -> None:
        self._active -= room_ids

    def _release_waiters(self, room_id: str | None = None) -> None:
        for rid in [room_id] if room_id is not None else list(self._waiters):
            if rid in self._active:
                for fut in self._waiters.pop(rid, []):
                    if not fut.done():
                        fut.set_result(None)
