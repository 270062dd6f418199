"""WebSocket viewers of the room: watch, chat (danmaku) and like, and measure.

A chat message carries a nonce and its send time in its text, so any viewer in
any worker process can time its delivery without shipping every receipt to the
parent: receipts are counted per nonce and latencies go into a histogram.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from dataclasses import dataclass, field
from typing import Any

import msgspec
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

from load.messages import ViewerResult

# Closes after which a real client stops instead of reconnecting (see docs/protocol.md).
FINAL_CLOSES = {1000, 1008, 1009, 4401, 4404}
MAX_RECONNECTS = 3
OPEN_TIMEOUT_S = 20.0
FILLERS = ("wow", "want it", "so cheap!", "link pls", "buying now", "666", "how big?", "love it")


class _Event(msgspec.Struct):
    """The few fields the load reads; every other field of every event is skipped."""
    type: str
    text: str = ""
    code: str = ""
    remaining: int = -1
    sold: int = -1
    server_time: int = 0
    ts: int = 0
    sale: Any = None


_decode = msgspec.json.Decoder(list[_Event]).decode
_encode = msgspec.json.Encoder().encode


def ws_url(base_url: str, room_id: str) -> str:
    if not base_url.startswith("http://"):
        raise ValueError(f"only http:// targets are supported, got {base_url!r}")
    return "ws://" + base_url[len("http://"):].rstrip("/") + f"/ws/rooms/{room_id}"


def now_ms() -> float:
    return time.time() * 1000.0


@dataclass
class RoomContext:
    """What a worker's viewers share: where to connect, the run's nonce prefix, the results."""
    url: str
    room_id: str
    run_id: str
    result: ViewerResult
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    offset_ms: float = 0.0  # server clock minus ours, for the observer's timelines
    sent: list[str] = field(default_factory=list)  # nonces this worker sent
    last_receipt: float = 0.0  # time.monotonic() of the last chat of ours received

    @property
    def prefix(self) -> str:
        return f"~{self.run_id}:"


class Viewer:
    def __init__(self, ctx: RoomContext, label: str, token: str | None, *, observer: bool = False) -> None:
        self.ctx = ctx
        self.label = label
        self.token = token
        self.observer = observer
        self.ws: ClientConnection | None = None
        self.events = 0
        self.frames = 0
        self._seq = 0

    async def connect(self) -> bool:
        """Open the socket and read the welcome; record how long it took, or why it failed."""
        r = self.ctx.result
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        t0 = time.perf_counter()
        try:
            ws = await connect(ws_url(self.ctx.url, self.ctx.room_id), additional_headers=headers, proxy=None,
                               compression=None, open_timeout=OPEN_TIMEOUT_S, ping_interval=None,
                               close_timeout=2, max_queue=64)
        except (TimeoutError, OSError, InvalidHandshake, InvalidURI) as exc:
            name = type(exc).__name__
            r.connect_failures[name] = r.connect_failures.get(name, 0) + 1
            return False
        try:
            first = await asyncio.wait_for(ws.recv(), OPEN_TIMEOUT_S)
            events = _decode(first)
            if not events or events[0].type != "welcome":
                raise ValueError(f"first frame is not a welcome: {str(first)[:200]}")
        except (TimeoutError, ConnectionClosed, ValueError, msgspec.DecodeError) as exc:
            name = type(exc).__name__
            r.connect_failures[name] = r.connect_failures.get(name, 0) + 1
            await ws.close()
            return False
        r.connect_ms.append((time.perf_counter() - t0) * 1000)
        self.frames += 1
        self.events += len(events)
        self.ws = ws
        return True

    async def run(self) -> None:
        """Receive until the worker stops; reconnect (with backoff) after a drop, as a client should."""
        r = self.ctx.result
        reconnects = 0
        while self.ws is not None:
            ws = self.ws
            code: int | None = None
            try:
                while True:
                    self._on_frame(await ws.recv())
            except ConnectionClosed as exc:
                code = exc.rcvd.code if exc.rcvd is not None else 1006
            if self.ctx.stop.is_set():
                break
            r.drops[code] = r.drops.get(code, 0) + 1
            self.ws = None
            if code in FINAL_CLOSES or reconnects >= MAX_RECONNECTS:
                break
            reconnects += 1
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.ctx.stop.wait(), 0.5 * 2 ** reconnects * random.uniform(0.5, 1.5))
            if self.ctx.stop.is_set():
                break
            r.reconnects += 1
            await self.connect()

    def _on_frame(self, raw: str | bytes) -> None:
        received = now_ms()
        self.frames += 1
        try:
            events = _decode(raw)
        except msgspec.DecodeError:
            self.ctx.result.server_errors["bad_frame"] = self.ctx.result.server_errors.get("bad_frame", 0) + 1
            return
        self.events += len(events)
        r = self.ctx.result
        for e in events:
            kind = e.type
            if kind == "chat":
                self._on_chat(e.text, received)
            elif kind == "error":
                r.server_errors[e.code] = r.server_errors.get(e.code, 0) + 1
            elif self.observer:
                at = received + self.ctx.offset_ms
                if kind == "sale_update":
                    r.sale_series.append((at, e.remaining, e.sold))
                elif kind == "sold_out":
                    r.sale_series.append((at, 0, -1))
                elif kind == "sale" and isinstance(e.sale, dict):
                    r.sale_series.append((at, int(e.sale["remaining"]), int(e.sale["sold"])))

    def _on_chat(self, text: str, received: float) -> None:
        r = self.ctx.result
        prefix = self.ctx.prefix
        i = text.find(prefix)
        if i < 0:
            r.foreign_chats += 1
            return
        try:
            sender, seq, sent = text[i + len(prefix):].split(".", 2)
            sent_ms = float(sent)
        except ValueError:
            r.foreign_chats += 1
            return
        if sender == self.label:
            return  # its own message coming back: "delivery" is to the other viewers
        nonce = f"{sender}.{seq}"
        self.ctx.last_receipt = time.monotonic()
        r.last_receipt_ms = received
        r.receipts[nonce] = r.receipts.get(nonce, 0) + 1
        latency = received - sent_ms
        r.danmaku.add(latency)
        if self.observer:
            r.danmaku_series.append((received + self.ctx.offset_ms, latency))

    async def send(self, message: dict[str, Any]) -> bool:
        ws = self.ws
        if ws is None:
            return False
        try:
            await ws.send(_encode(message).decode())
            return True
        except ConnectionClosed:
            return False

    async def chat(self) -> None:
        self._seq += 1
        nonce = f"{self.label}.{self._seq}"
        # The send time rides in the text; every worker shares this machine's wall clock.
        sent = now_ms()
        text = f"{random.choice(FILLERS)} {self.ctx.prefix}{nonce}.{sent:.1f}"
        if await self.send({"type": "chat", "text": text}):
            self.ctx.result.chats_sent += 1
            self.ctx.result.chat_send_ms.add(now_ms() - sent)
            self.ctx.sent.append(nonce)

    async def like(self) -> None:
        if await self.send({"type": "like", "count": random.randint(1, 5)}):
            self.ctx.result.likes_sent += 1

    async def close(self) -> None:
        ws = self.ws
        if ws is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ws.close(), 3.0)

    def finish(self) -> None:
        self.ctx.result.events.append(self.events)
        self.ctx.result.frames.append(self.frames)


async def every(interval_s: float, action: Any, stop: asyncio.Event, until: float,
                result: ViewerResult | None = None) -> None:
    """Call `action()` every interval (random phase, so chatters do not fire in step) until stop or `until`."""
    if interval_s <= 0:
        return
    next_at = time.monotonic() + random.uniform(0, interval_s)
    while not stop.is_set() and next_at < until:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), max(0.0, next_at - time.monotonic()))
        if stop.is_set():
            return
        await action()
        next_at += interval_s
        if next_at < time.monotonic():  # fell behind (a stall): skip, do not burst to catch up
            missed = int((time.monotonic() - next_at) / interval_s) + 1
            if result is not None:
                result.chats_skipped += missed
            next_at += missed * interval_s


async def clock_offset(url: str, room_id: str, samples: int = 5) -> tuple[float, float]:
    """Server clock minus ours, from ping/pong round trips (NTP style, best round trip wins)."""
    best: tuple[float, float] | None = None
    async with connect(ws_url(url, room_id), proxy=None, compression=None, open_timeout=OPEN_TIMEOUT_S,
                       ping_interval=None, close_timeout=2) as ws:
        welcome = _decode(await asyncio.wait_for(ws.recv(), OPEN_TIMEOUT_S))
        if welcome and welcome[0].server_time:
            best = (welcome[0].server_time - now_ms(), float("inf"))
        for _ in range(samples):
            t0 = now_ms()
            await ws.send('{"type":"ping"}')
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                events = _decode(await asyncio.wait_for(ws.recv(), max(0.01, deadline - time.monotonic())))
                pong = next((e for e in events if e.type == "pong"), None)
                if pong is not None:
                    t1 = now_ms()
                    rtt = t1 - t0
                    if best is None or rtt < best[1]:
                        best = (pong.ts - (t0 + t1) / 2, rtt)
                    break
    return best if best is not None else (0.0, float("nan"))
