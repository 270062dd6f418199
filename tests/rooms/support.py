"""Helpers for the room WebSocket tests: connect as a viewer, collect the events
of the batched frames, wait for a close, and a few HTTP shortcuts.

Server frames are JSON arrays of events (one array per 50 ms tick), and
unrelated events (viewers, likes) interleave with the ones a test waits for,
so tests never read "the next frame": they consume events until one matches
a predicate, bounded by a deadline (never a timing assertion, only a guard
against hanging).
"""

from __future__ import annotations

import asyncio
import json
import secrets
from collections import deque
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any, AsyncIterator, Callable, Iterable

import httpx
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed
from websockets.frames import Close

from tests.support import Actor, eventually

Event = dict[str, Any]
Pred = Callable[[Event], bool]

RECV_TIMEOUT = 5.0  # a guard against hanging, never an assertion about speed


def ws_url(base_url: str, room_id: str) -> str:
    assert base_url.startswith("http://127.0.0.1:"), base_url  # loopback only
    return "ws://" + base_url[len("http://"):] + f"/ws/rooms/{room_id}"


def of_type(kind: str, **fields: Any) -> Pred:
    return lambda e: e.get("type") == kind and all(e.get(k) == v for k, v in fields.items())


def chat_text(text: str) -> Pred:
    return of_type("chat", text=text)


def tag(prefix: str = "m") -> str:
    return f"{prefix}-{secrets.token_hex(4)}"


def brief(events: list[Event], limit: int = 2000) -> str:
    """Events for an assertion message, cut short (pins carry long descriptions)."""
    text = repr(events)
    return text if len(text) <= limit else text[:limit] + f"... ({len(events)} events)"


class Viewer:
    """One WebSocket client of a room, with a buffer of received, not yet consumed events."""

    def __init__(self, ws: ClientConnection, label: str) -> None:
        self.ws = ws
        self.label = label
        self.pending: deque[Event] = deque()
        self.seen: list[Event] = []  # every event received, in order
        self.frames: list[list[Event]] = []  # every frame received, as decoded
        self.welcome: Event | None = None

    async def _receive_frame(self, deadline: float) -> None:
        remaining = deadline - asyncio.get_running_loop().time()
        if remaining <= 0:
            raise TimeoutError
        raw = await asyncio.wait_for(self.ws.recv(), remaining)
        assert isinstance(raw, str), f"{self.label}: the server sent a binary frame"
        batch = json.loads(raw)
        assert isinstance(batch, list) and batch, f"{self.label}: a frame must be a non-empty JSON array: {raw!r}"
        for event in batch:
            assert isinstance(event, dict) and isinstance(event.get("type"), str), raw
        self.frames.append(batch)
        self.pending.extend(batch)
        self.seen.extend(batch)

    async def collect_until(self, pred: Pred, timeout: float = RECV_TIMEOUT, what: str = "") -> list[Event]:
        """Consume events up to and including the first that matches; return them all."""
        deadline = asyncio.get_running_loop().time() + timeout
        taken: list[Event] = []
        while True:
            while self.pending:
                event = self.pending.popleft()
                taken.append(event)
                if pred(event):
                    return taken
            try:
                await self._receive_frame(deadline)
            except TimeoutError:
                raise AssertionError(f"{self.label}: no {what or 'matching event'} within {timeout}s; "
                                     f"got {brief(taken)}") from None

    async def expect(self, pred: Pred, timeout: float = RECV_TIMEOUT, what: str = "") -> Event:
        return (await self.collect_until(pred, timeout, what))[-1]

    async def expect_all(self, *preds: Pred, timeout: float = RECV_TIMEOUT, what: str = "") -> list[Event]:
        """Consume events until each predicate has matched one, in any order; return the matches in the
        order of the predicates."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        found: dict[int, Event] = {}
        while len(found) < len(preds):
            missing = [i for i in range(len(preds)) if i not in found]
            event = await self.expect(lambda e, missing=missing: any(preds[i](e) for i in missing),  # type: ignore[misc]
                                      max(0.0, deadline - loop.time()), what or "all expected events")
            found.update({i: event for i in missing if preds[i](event)})
        return [found[i] for i in range(len(preds))]

    async def expect_type(self, kind: str, timeout: float = RECV_TIMEOUT, **fields: Any) -> Event:
        return await self.expect(of_type(kind, **fields), timeout, what=f"{kind} {fields or ''}")

    async def expect_error(self, code: str, timeout: float = RECV_TIMEOUT) -> Event:
        """The next `error` event; it must carry `code` (an error with another code fails)."""
        event = await self.expect(of_type("error"), timeout, what=f"error {code}")
        assert event["code"] == code, event
        assert isinstance(event["message"], str) and event["message"], event
        return event

    async def send(self, message: Any) -> None:
        await self.ws.send(message if isinstance(message, (str, bytes)) else json.dumps(message))

    async def chat(self, text: str) -> None:
        await self.send({"type": "chat", "text": text})

    async def like(self, count: int = 1) -> None:
        await self.send({"type": "like", "count": count})

    async def ping(self, timeout: float = RECV_TIMEOUT) -> list[Event]:
        """A ping round trip; returns the events consumed on the way (pong included)."""
        await self.send({"type": "ping"})
        return await self.collect_until(of_type("pong"), timeout, what="pong")

    async def expect_close(self, timeout: float = RECV_TIMEOUT) -> tuple[list[Event], Close | None]:
        """Consume events until the server closes; return them and the close frame received (None if the
        connection ended without one)."""
        deadline = asyncio.get_running_loop().time() + timeout
        taken: list[Event] = list(self.pending)
        self.pending.clear()
        while True:
            try:
                await self._receive_frame(deadline)
            except ConnectionClosed as exc:
                return taken, exc.rcvd
            except TimeoutError:
                raise AssertionError(f"{self.label}: still open after {timeout}s; got {brief(taken)}") from None
            taken.extend(self.pending)
            self.pending.clear()


@asynccontextmanager
async def open_viewer(base_url: str, room_id: str, token: str | None = None, *, label: str = "viewer",
                      cookie: str | None = None, origin: str | None = None, welcome: bool = True,
                      headers: dict[str, str] | None = None, **connect_kwargs: Any) -> AsyncIterator[Viewer]:
    """Connect to a room (bearer `token`, or `cookie` as the session cookie, or neither) and, unless
    `welcome` is False, consume and check the first frame, which must be the welcome alone."""
    extra = dict(headers or {})
    if token is not None:
        extra["Authorization"] = f"Bearer {token}"
    if cookie is not None:
        extra["Cookie"] = f"livesale_session={cookie}"
    connect_kwargs.setdefault("open_timeout", 10)
    connect_kwargs.setdefault("close_timeout", 3)
    async with connect(ws_url(base_url, room_id), origin=origin, additional_headers=extra, proxy=None,  # type: ignore[arg-type]
                       compression=None, **connect_kwargs) as ws:
        viewer = Viewer(ws, label)
        if welcome:
            deadline = asyncio.get_running_loop().time() + RECV_TIMEOUT
            await viewer._receive_frame(deadline)
            first = viewer.frames[0]
            assert len(first) == 1 and first[0]["type"] == "welcome", first
            viewer.welcome = viewer.pending.popleft()
        yield viewer


@asynccontextmanager
async def open_viewers(base_url: str, room_id: str, tokens: Iterable[str | None], **kwargs: Any
                       ) -> AsyncIterator[list[Viewer]]:
    """Several viewers at once (closed together)."""
    async with AsyncExitStack() as stack:
        yield [await stack.enter_async_context(open_viewer(base_url, room_id, t, label=f"viewer{i}", **kwargs))
               for i, t in enumerate(tokens)]


async def sync_point(sender: Viewer, viewers: Iterable[Viewer], timeout: float = RECV_TIMEOUT
                     ) -> list[list[Event]]:
    """`sender` chats a unique marker; every viewer consumes events up to it. Room events reach every
    process through one Redis channel in one order, so whatever the room published before the marker
    is in what each viewer consumed (the marker included, last)."""
    marker = tag("sync")
    await sender.chat(marker)
    return [await v.collect_until(chat_text(marker), timeout, what=f"marker {marker}") for v in viewers]


async def chat_until_heard(sender: Viewer, receiver: Viewer, *, timeout: float, wait: float = 2.0,
                           what: str = "a chat message") -> None:
    """`sender` chats one marker, again every `wait` seconds, until `receiver` gets it: for a room
    whose events come back once an outage or a topology change is over."""
    marker = tag("heard")

    async def heard() -> bool:
        await sender.chat(marker)
        try:
            await receiver.expect(chat_text(marker), timeout=wait)
            return True
        except AssertionError:
            return False
    await eventually(heard, timeout=timeout, what=what)


async def pin(api: httpx.AsyncClient, room_id: str, product_id: str, who: Actor) -> httpx.Response:
    return await api.post(f"/api/rooms/{room_id}/pin", json={"product_id": product_id}, headers=who.auth)


async def stats(api: httpx.AsyncClient, room_id: str, who: Actor) -> dict[str, Any]:
    r = await api.get(f"/api/rooms/{room_id}/stats", headers=who.auth)
    assert r.status_code == 200, r.text
    return dict(r.json())


def errors_in(events: Iterable[Event]) -> list[Event]:
    return [e for e in events if e.get("type") == "error"]


def chats_in(events: Iterable[Event]) -> list[str]:
    return [e["text"] for e in events if e.get("type") == "chat"]
