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
import os
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Collection, Coroutine

import msgspec

from server.auth import Principal
from server.loops import running
from server.metrics import CLOSED, CONNECTIONS, FRAMES
from server.rooms import protocol
from server.rooms.broker import CONTROL, EVERYONE, HOST, Broker
from server.rooms.store import Counts, RoomStore, Snapshot
from server.text import folded

log = logging.getLogger("livesale.rooms.hub")

TICK_S = 0.05
VIEWERS_EVERY_S = 1.0
HEARTBEAT_S = 10.0
META_TTL_S = 5.0
BANNED_TTL_S = 5.0
JOIN_TIMEOUT_S = 10.0
QUEUE_FRAMES = int(os.environ.get("LIVESALE_WS_QUEUE_FRAMES", "64"))
# Frames held for a viewer whose welcome is on its way (joining, or a resync): more than a
# join may take (JOIN_TIMEOUT_S) at one frame per tick. They are shared strings: pointers only.
EARLY_FRAMES = 256
SEND_TIMEOUT_S = 10.0  # a send that cannot complete in this long means a dead or stalled peer
STALL_CHECK_S = 1.0
PINGS_PER_S, PINGS_BURST = 10, 30

MetaLoader = Callable[[str], Awaitable[dict[str, Any] | None]]
SaleLoader = Callable[[str], Awaitable[dict[str, Any] | None]]


@dataclass(frozen=True)
class Close:
    code: int
    reason: str


class TokenBucket:
    """A local bucket, for limits that only need to hold per connection."""
    __slots__ = ("rate", "burst", "tokens", "at")

    def __init__(self, rate: float, burst: float) -> None:
        self.rate, self.burst, self.tokens, self.at = rate, burst, burst, time.monotonic()

    def take(self, n: float = 1.0) -> bool:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens >= n:
            self.tokens -= n
            return True
        return False


class Connection:
    """One viewer's socket: a bounded queue of frames, drained by its writer task."""
    __slots__ = ("id", "room_id", "principal", "is_host", "queue", "ready", "early", "closed", "likes_bucket", "pings",
                 "strikes", "writer", "sending_since", "__weakref__")

    def __init__(self, room_id: str, principal: Principal | None, is_host: bool) -> None:
        self.id = secrets.token_hex(8)
        self.room_id = room_id
        self.principal = principal
        self.is_host = is_host
        self.queue: asyncio.Queue[str | Close] = asyncio.Queue(QUEUE_FRAMES)
        self.ready = False        # False until the welcome is queued
        self.early: list[str | Close] = []  # what came before the welcome: frames, perhaps a close
        self.closed = False
        self.likes_bucket = TokenBucket(rate=20, burst=20)
        # Pings: a client syncs its clock with a few, then sends one every 15 s; each costs a pong.
        self.pings = TokenBucket(rate=PINGS_PER_S, burst=PINGS_BURST)
        # Abuse counter: invalid frames and refused messages; decays 1 per second.
        self.strikes = TokenBucket(rate=1, burst=20)
        # The writer task, and when its current send began (0: not sending). A send waits only
        # while the socket's buffer is full; the hub's tick ends writers stalled for too long.
        # (A timeout around each send cost more than the send: a task per frame, on Python 3.11.)
        self.writer: asyncio.Task[None] | None = None
        self.sending_since = 0.0

    def offer(self, frame: str) -> None:
        if self.closed:
            return
        if not self.ready:
            if len(self.early) >= EARLY_FRAMES:  # the welcome is late: no more waiting without bound
                self.close(protocol.TRY_AGAIN_LATER, "too slow: reconnect", flush=False)
                return
            self.early.append(frame)
            return
        self._put(frame)

    def _put(self, frame: str) -> None:
        try:
            self.queue.put_nowait(frame)
        except asyncio.QueueFull:
            # A viewer that cannot keep up is dropped rather than buffered without bound.
            self.close(protocol.TRY_AGAIN_LATER, "too slow: reconnect", flush=False)

    def start(self, welcome: str) -> None:
        """Queue the welcome, then what came while the viewer joined, a close included: a room
        that ends as someone joins still shows them its welcome (status `ended`) first."""
        self.ready = True
        early, self.early = self.early, []
        frames: list[str] = []
        deferred: Close | None = None
        for item in early:
            if isinstance(item, Close):
                deferred = item
                break
            frames.append(item)
        # The frames that came while it joined go as one (each is a JSON array of events): a
        # slow join in a busy room gathers more of them than the queue holds.
        for item in (welcome, *([protocol.join_batches(frames)] if frames else [])):
            if self.closed and deferred is None:  # closed at once (flush=False): nothing more to send
                return
            self._put(item)
        if deferred is not None:
            self._queue_close(deferred, flush=True)

    def close(self, code: int, reason: str, *, flush: bool = True) -> None:
        """Close after the queued frames (flush) or at once, dropping them."""
        if self.closed:
            return
        self.closed = True
        CLOSED.labels(str(code)).inc()
        if flush and not self.ready:
            self.early.append(Close(code, reason))  # after the welcome: start() queues it
            return
        self._queue_close(Close(code, reason), flush)

    def _queue_close(self, close: Close, flush: bool) -> None:
        if flush:
            try:
                self.queue.put_nowait(close)
                return
            except asyncio.QueueFull:
                pass
        while not self.queue.empty():
            self.queue.get_nowait()
        self.queue.put_nowait(close)

    def stalled(self, now: float) -> bool:
        return self.sending_since != 0.0 and now - self.sending_since > SEND_TIMEOUT_S

    def strike(self) -> bool:
        """Count one bad frame; True when the client has earned a policy close."""
        return not self.strikes.take()


@dataclass(frozen=True)
class RoomState:
    """What a welcome shows of a room, read once for all who are welcomed together."""
    snapshot: Snapshot
    meta: dict[str, Any]
    sale: dict[str, Any] | None


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
    banned: list[str] | None = None
    banned_at: float = 0.0


class Hub:
    def __init__(self, store: RoomStore, broker: Broker, load_meta: MetaLoader) -> None:
        self.store = store
        self.broker = broker
        self.load_meta = load_meta
        self.load_sale: SaleLoader | None = None  # set by the inventory layer
        self.rooms: dict[str, LocalRoom] = {}
        self._meta: dict[str, tuple[float, dict[str, Any] | None]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._stall_checked_at = 0.0

    # --- connections ------------------------------------------------------------
    async def join(self, conn: Connection) -> Counts:
        room = self.rooms.get(conn.room_id)
        if room is None:
            room = self.rooms[conn.room_id] = LocalRoom(conn.room_id)
        room.conns.add(conn)
        CONNECTIONS.inc()
        await asyncio.wait_for(self.broker.subscribe(conn.room_id), JOIN_TIMEOUT_S)
        viewer = conn.principal.user_id if conn.principal else None
        counts = await self.store.join(conn.room_id, conn.id, viewer)
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
            await self.store.leave(conn.room_id, conn.id)
        except Exception as exc:  # Redis down: the entry expires by itself (PRESENCE_TTL_MS)
            log.warning("presence leave failed for room %s: %r", conn.room_id, exc)

    async def welcome(self, conn: Connection) -> dict[str, Any]:
        """Queue the welcome (after join: the room's events already flow); return the room it showed."""
        state = await self._room_state(conn.room_id)
        conn.start(self._welcome_frame(conn, state))
        return state.meta

    async def _room_state(self, room_id: str) -> RoomState:
        snap = await self.store.snapshot(room_id)
        meta = await self.room_meta(room_id) or {}
        sale = await self.load_sale(snap.sale_id) if snap.sale_id and self.load_sale else None
        return RoomState(snap, meta, sale)

    @staticmethod
    def _welcome_frame(conn: Connection, state: RoomState) -> str:
        you = None
        if conn.principal is not None:
            p = conn.principal
            you = {"user_id": p.user_id, "name": p.name, "role": p.role, "is_host": conn.is_host}
        snap = state.snapshot
        event = protocol.Welcome(room=state.meta, you=you, pinned_product=snap.pin, sale=state.sale,
                                 likes=snap.likes,
                                 viewers=protocol.Counts(online=snap.counts.online, peak=snap.counts.peak),
                                 history=snap.history, server_time=int(time.time() * 1000))
        return protocol.batch([protocol.encode(event)])

    # --- shared state the connections read -----------------------------------------
    async def room_meta(self, room_id: str) -> dict[str, Any] | None:
        """The room as viewers see it. Cached only while this process is subscribed to the
        room (so `meta` control messages keep the cache true); read fresh otherwise."""
        cached = self._meta.get(room_id)
        if cached is not None and time.monotonic() - cached[0] < META_TTL_S:
            return cached[1]
        meta = await self.load_meta(room_id)
        if room_id in self.rooms:
            self._meta[room_id] = (time.monotonic(), meta)
        return meta

    async def banned_words(self, room_id: str) -> list[str]:
        room = self.rooms.get(room_id)
        if room is not None and room.banned is not None and time.monotonic() - room.banned_at < BANNED_TTL_S:
            return room.banned
        words = [folded(w) for w in await self.store.banned_words(room_id)]  # also lists saved before NFKC
        if room is not None:
            room.banned, room.banned_at = words, time.monotonic()
        return words

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
        if audience != CONTROL:
            room.events.append((audience, payload))
            return
        try:
            control = msgspec.json.decode(payload)
        except msgspec.DecodeError:
            log.error("bad control message in room %s", room_id)
            return
        op = control.get("op")
        if op == "meta":
            self._meta[room_id] = (time.monotonic(), control["room"])
        elif op == "banned":
            room.banned = None
        elif op == "close":
            self._flush_events(room)  # let `room_ended` go out first
            for conn in list(room.conns):
                conn.close(int(control["code"]), str(control.get("reason", "")))

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
            self._meta.pop(room.room_id, None)
            conns = [c for c in room.conns if not c.closed]
            for conn in conns:
                conn.ready = False  # what comes meanwhile follows the new welcome
            try:
                await self._refresh_presence({room.room_id: conns})
                state = await self._room_state(room.room_id)
            except Exception as exc:
                log.warning("resync of room %s failed (%r); its %d viewers reconnect", room.room_id, exc, len(conns))
                for conn in conns:
                    conn.close(protocol.TRY_AGAIN_LATER, "could not resync: reconnect", flush=False)
                continue
            room.viewers_dirty = True
            for conn in conns:
                conn.start(self._welcome_frame(conn, state))

    # --- the tick -----------------------------------------------------------------------
    def _flush_events(self, room: LocalRoom) -> None:
        if not room.events:
            return
        events, room.events = room.events, []
        everyone = [e for audience, e in events if audience == EVERYONE]
        frame_all = protocol.batch(everyone) if everyone else None
        has_host_events = len(everyone) != len(events)
        frame_host = protocol.batch([e for a, e in events if a in (EVERYONE, HOST)]) if has_host_events \
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
            await self.store.flush_likes(room.room_id, likes)
        finally:
            room.likes_busy = False

    async def _publish_viewers(self, room: LocalRoom, only_if_changed: bool) -> None:
        try:
            counts = await self.store.counts(room.room_id)
            if only_if_changed and counts == room.viewers_sent:
                return
            await self.broker.publish(room.room_id, EVERYONE,
                                      protocol.encode(protocol.Viewers(online=counts.online, peak=counts.peak)))
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
        await self.store.refresh({rid: [c.id for c in conns] for rid, conns in present.items()})
        # A connection that left during the refresh may have been added back after its leave.
        left = {rid: [c.id for c in conns if c.closed] for rid, conns in present.items()}
        if any(left.values()):
            await self.store.forget(left)

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
                self._meta.pop(room_id, None)
                self.broker.unsubscribe(room_id)

    async def run(self) -> None:
        last_beat = time.monotonic()
        while running():
            await asyncio.sleep(TICK_S)
            try:
                self.tick()
            except Exception:  # a bug in one tick must not stop the room layer
                log.exception("hub tick failed")
            if time.monotonic() - last_beat >= HEARTBEAT_S:
                last_beat = time.monotonic()
                self._spawn(self._heartbeat())

    def shutdown(self) -> None:
        for room in self.rooms.values():
            for conn in list(room.conns):
                conn.close(protocol.GOING_AWAY, "server shutting down")
        for task in list(self._tasks):
            task.cancel()
