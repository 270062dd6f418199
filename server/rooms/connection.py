"""One viewer's socket as the room layer sees it: a bounded queue of frames that its writer
task drains, the frames that came before its welcome, and its per-connection limits."""

from __future__ import annotations

import asyncio
import secrets
import time
from dataclasses import dataclass

from server.auth import Principal
from server.metrics import CLOSED
from server.rooms import protocol

# Frames held for a viewer whose welcome is on its way (joining, or a resync): more than a
# join may take (hub.JOIN_TIMEOUT_S) at one frame per tick. They are shared strings: pointers only.
EARLY_FRAMES = 256
SEND_TIMEOUT_S = 10.0  # a send that cannot complete in this long means a dead or stalled peer
PINGS_PER_S, PINGS_BURST = 10, 30


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

    def __init__(self, room_id: str, principal: Principal | None, is_host: bool, queue_frames: int) -> None:
        self.id = secrets.token_hex(8)
        self.room_id = room_id
        self.principal = principal
        self.is_host = is_host
        self.queue: asyncio.Queue[str | Close] = asyncio.Queue(queue_frames)
        self.ready = False        # False until the welcome is queued
        self.early: list[str | Close] = []  # what came before the welcome: frames, perhaps a close
        self.closed = False
        self.likes_bucket = TokenBucket(rate=protocol.MAX_LIKE_FRAMES_PER_S, burst=protocol.MAX_LIKE_FRAMES_PER_S)
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
