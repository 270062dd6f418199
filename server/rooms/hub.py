"""This process's WebSocket connections, grouped by room, and the tick that feeds them.

Events reach the hub only through Redis (the broker), also those published
by this process, so every process sees one order. Each tick (TICK_S) the hub
frames a room's pending events as one JSON array, encodes it once, and
offers the same string to every local connection of the room. The room's
host gets a second frame that also carries host-only events.

Likes are summed per user for the tick and added to the shared total by one
script call per room and tick; viewer counts are published at most once a
second per room and process.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Collection, Coroutine

import msgspec

from server.backends.loops import repeat
from server.metrics import CLOSED, CONNECTIONS, FRAMES
from server.rooms import protocol
from server.rooms.broker import Broker
from server.rooms.connection import Connection
from server.rooms.publisher import Publisher
from server.rooms.service import BannedWords
from server.rooms.store import Counts, RoomStore
from server.rooms.welcome import Welcomes

log = logging.getLogger("livesale.rooms.hub")

VIEWERS_EVERY_S = 1.0
HEARTBEAT_S = 10.0
JOIN_TIMEOUT_S = 10.0
STALL_CHECK_S = 1.0


@dataclass
class LocalRoom:
    room_id: str
    conns: set[Connection] = field(default_factory=set)
    events: list[tuple[bytes, bytes]] = field(default_factory=list)
    likes: dict[str, list[int]] = field(default_factory=dict)  # user -> [frames, taps]
    likes_busy: bool = False
    viewers_dirty: bool = False   # joined or left here: publish the counts
    recount: bool = False         # the heartbeat: publish the counts if they differ from viewers_sent
    viewers_busy: bool = False
    viewers_at: float = 0.0
    viewers_sent: Counts | None = None


class Hub:
    """The broker's listener (server.rooms.broker.Listener) in a web process."""

    def __init__(self, store: RoomStore, broker: Broker, publisher: Publisher, banned: BannedWords,
                 welcomes: Welcomes) -> None:
        self._store = store
        self._broker = broker
        self._publisher = publisher
        self._banned = banned
        self._welcomes = welcomes
        self.rooms: dict[str, LocalRoom] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._stall_checked_at = 0.0

    # --- connections ------------------------------------------------------------
    async def join(self, conn: Connection) -> Counts:
        room = self.rooms.get(conn.room_id)
        if room is None:
            room = self.rooms[conn.room_id] = LocalRoom(conn.room_id)
        room.conns.add(conn)
        CONNECTIONS.inc()
        await asyncio.wait_for(self._broker.subscribe(conn.room_id), JOIN_TIMEOUT_S)
        viewer = conn.principal.user_id if conn.principal else None
        counts = await self._store.join(conn.room_id, conn.id, viewer)
        room.viewers_dirty = True
        return counts

    async def leave(self, conn: Connection) -> None:
        conn.closed = True
        room = self.rooms.get(conn.room_id)
        if room is None or conn not in room.conns:
            return
        room.conns.discard(conn)
        CONNECTIONS.dec()
        room.viewers_dirty = True
        try:
            await self._store.leave(conn.room_id, conn.id)
        except Exception as exc:  # Redis down: the entry expires by itself (PRESENCE_TTL_MS)
            log.warning("presence leave failed for room %s: %r", conn.room_id, exc)

    async def welcome(self, conn: Connection) -> dict[str, Any]:
        """Queue the welcome (after join: the room's events already flow); return the room it showed."""
        state = await self._welcomes.read(conn.room_id)
        conn.start(self._welcomes.frame(conn, state))
        return state.meta

    async def room_meta(self, room_id: str) -> dict[str, Any] | None:
        """The room as viewers see it (None: no such room), cached while it has viewers here."""
        return await self._welcomes.room_meta(room_id, keep=room_id in self.rooms)

    def add_likes(self, room_id: str, user_id: str, taps: int) -> None:
        room = self.rooms.get(room_id)
        if room is None:
            return
        entry = room.likes.get(user_id)
        if entry is None:
            room.likes[user_id] = [1, taps]
        else:
            entry[0] += 1
            entry[1] += taps

    # --- from the broker ------------------------------------------------------------
    def on_message(self, room_id: str, data: bytes) -> None:
        room = self.rooms.get(room_id)
        if room is None or not data:
            return
        audience, payload = data[:1], data[1:]
        if audience != protocol.CONTROL:
            room.events.append((audience, payload))
            return
        try:
            control = protocol.decode_control(payload)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            log.error("bad control message in room %s: %s", room_id, exc)
            return
        if isinstance(control, protocol.MetaChanged):
            self._welcomes.meta_changed(room_id, control.room)
        elif isinstance(control, protocol.BannedChanged):
            self._banned.forget(room_id)
        else:
            self._flush_events(room)  # let `room_ended` go out first
            for conn in list(room.conns):
                conn.close(control.code, control.reason)

    def end_sessions(self, session_ids: Collection[str]) -> None:
        """The sessions logged out: close their sockets here."""
        for room in self.rooms.values():
            for conn in list(room.conns):
                if conn.principal is not None and conn.principal.session_id in session_ids:
                    conn.close(protocol.SESSION_ENDED, "logged out")

    async def resync(self) -> None:
        """After a pub/sub outage events may have been lost: send everyone a fresh welcome (the
        room read once, however many watch it), and count everyone present again (entries not
        refreshed during a long outage have expired). A room that cannot be read now (Redis
        or the database away again) closes its viewers with 1013: they reconnect later."""
        for room in list(self.rooms.values()):
            self._welcomes.forget(room.room_id)
            conns = [c for c in room.conns if not c.closed]
            for conn in conns:
                conn.ready = False  # what comes meanwhile follows the new welcome
            try:
                await self._refresh_presence({room.room_id: conns})
                state = await self._welcomes.read(room.room_id)
            except Exception as exc:
                log.warning("resync of room %s failed (%r); its %d viewers reconnect", room.room_id, exc, len(conns))
                for conn in conns:
                    conn.close(protocol.TRY_AGAIN_LATER, "could not resync: reconnect", flush=False)
                continue
            room.viewers_dirty = True
            for conn in conns:
                conn.start(self._welcomes.frame(conn, state))

    # --- the tick -----------------------------------------------------------------------
    def _flush_events(self, room: LocalRoom) -> None:
        if not room.events:
            return
        events, room.events = room.events, []
        everyone = [e for audience, e in events if audience == protocol.EVERYONE]
        frame_all = protocol.batch(everyone) if everyone else None
        has_host_events = len(everyone) != len(events)
        frame_host = protocol.batch([e for a, e in events if a in (protocol.EVERYONE, protocol.HOST)]) \
            if has_host_events \
            else frame_all
        sent = 0
        for conn in room.conns:
            frame = frame_host if conn.is_host else frame_all
            if frame is not None:
                conn.offer(frame)
                sent += 1
        FRAMES.inc(sent)

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("room background task failed: %r", task.exception())

    async def _flush_likes(self, room: LocalRoom, likes: dict[str, list[int]]) -> None:
        try:
            await self._store.flush_likes(room.room_id, likes)
        finally:
            room.likes_busy = False

    async def _publish_viewers(self, room: LocalRoom, only_if_changed: bool) -> None:
        try:
            counts = await self._store.counts(room.room_id)
            if only_if_changed and counts == room.viewers_sent:
                return
            await self._publisher.publish(room.room_id,
                                          protocol.to_everyone(protocol.Viewers(online=counts.online, peak=counts.peak)))
            room.viewers_sent = counts
        finally:
            room.viewers_busy = False

    async def _heartbeat(self) -> None:
        now = time.time()
        present: dict[str, list[Connection]] = {}
        for room_id, room in self.rooms.items():
            for conn in room.conns:
                if conn.principal is not None and conn.principal.expires_at <= now:
                    conn.close(protocol.SESSION_ENDED, "session expired")
            if room.conns:
                present[room_id] = list(room.conns)
                room.recount = True  # viewers of a process that died drop out of presence: tell the room
        await self._refresh_presence(present)

    async def _refresh_presence(self, present: dict[str, list[Connection]]) -> None:
        await self._store.refresh({rid: [c.id for c in conns] for rid, conns in present.items()})
        # A connection that left during the refresh may have been added back after its leave.
        left = {rid: [c.id for c in conns if c.closed] for rid, conns in present.items()}
        if any(left.values()):
            await self._store.forget(left)

    def _end_stalled(self, now: float) -> None:
        """End the connections whose peer stopped reading: their send has waited too long."""
        for room in self.rooms.values():
            for conn in room.conns:
                if conn.writer is not None and conn.stalled(now) and not conn.writer.done():
                    conn.writer.cancel()
                    CLOSED.labels("stalled").inc()

    def tick(self) -> None:
        now = time.monotonic()
        if now - self._stall_checked_at >= STALL_CHECK_S:
            self._stall_checked_at = now
            self._end_stalled(now)
        for room_id, room in list(self.rooms.items()):
            self._flush_events(room)
            if room.likes and not room.likes_busy:
                likes, room.likes, room.likes_busy = room.likes, {}, True
                self._spawn(self._flush_likes(room, likes))
            if (room.viewers_dirty or room.recount) and not room.viewers_busy \
                    and now - room.viewers_at >= VIEWERS_EVERY_S:
                only_if_changed = not room.viewers_dirty  # a recount is told only if it differs
                room.viewers_busy, room.viewers_dirty, room.recount, room.viewers_at = True, False, False, now
                self._spawn(self._publish_viewers(room, only_if_changed))
            if not room.conns and not room.likes and not room.likes_busy and not room.viewers_dirty \
                    and not room.viewers_busy:
                del self.rooms[room_id]
                self._welcomes.forget(room_id)
                self._banned.forget(room_id)
                self._broker.unsubscribe(room_id)

    async def run(self) -> None:
        """The tick, and every HEARTBEAT_S the heartbeat, until cancelled."""
        last_beat = time.monotonic()

        async def step() -> None:
            nonlocal last_beat
            self.tick()
            if time.monotonic() - last_beat >= HEARTBEAT_S:
                last_beat = time.monotonic()
                self._spawn(self._heartbeat())

        await repeat(step, every_s=protocol.TICK_S, what="hub tick", logger=log)

    def shutdown(self) -> None:
        for room in self.rooms.values():
            for conn in list(room.conns):
                conn.close(protocol.GOING_AWAY, "server shutting down")
        for task in list(self._tasks):
            task.cancel()
