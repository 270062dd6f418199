"""Hostile input on the room socket, against the shared real server: hypothesis-generated frames
(any JSON, wrong types, unknown fields, deep nesting, huge strings, garbage text, binary), frames
that break the WebSocket framing itself (written by hand on a TCP socket), and invalid UTF-8.

Whatever comes in: the server answers the sender with an `error` event or closes it with a close
code, stays healthy, logs no unhandled error, and a bystander in the same room notices nothing.
api/test_room_socket.py has the fixed list of bad frames; this is the open-ended version.
"""

from __future__ import annotations

import asyncio
import json
import struct
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.exceptions import ConnectionClosed

from server.rooms import protocol
from server.text import clean
from tests.reliability.support import OP_BINARY, OP_CLOSE, OP_CONT, OP_PING, OP_TEXT, LogWindow, RawSocket, frame
from tests.rooms.support import Event, Viewer, chat_text, open_viewer, tag
from tests.support import ServerProcess, api_client, create_room, guest, register

pytestmark = pytest.mark.reliability

MAX_FRAME = protocol.MAX_FRAME_BYTES
# `error` codes a logged-in sender may get for a frame of its own (docs/protocol.md).
SENDER_ERRORS = {"malformed_json", "invalid_message", "binary_frame", "invalid_text", "rate_limited"}
# What the server may close a bad sender with: 1008 (abuse), 1009 (too big).
ABUSE_CLOSES = {1008, 1009}


# --- the room, a fuzzing sender and a bystander --------------------------------------------------------

@dataclass
class Bystander:
    viewer: Viewer
    events: list[Event] = field(default_factory=list)
    task: asyncio.Task[None] | None = None

    async def drain(self) -> None:
        """Read everything the room sends, so the bystander never lags (a slow reader gets dropped)."""
        try:
            while True:
                await self.viewer._receive_frame(asyncio.get_running_loop().time() + 3600)
                self.events.extend(self.viewer.pending)
                self.viewer.pending.clear()
        except (ConnectionClosed, TimeoutError, asyncio.CancelledError):
            return


@dataclass
class Fuzz:
    server: ServerProcess
    room_id: str
    token: str
    bystander: Bystander
    log: LogWindow
    viewer: Viewer | None = None
    context: Any = None
    closes: dict[int | None, int] = field(default_factory=dict)
    frames: int = 0

    async def connect(self) -> Viewer:
        if self.viewer is None:
            self.context = open_viewer(self.server.url, self.room_id, self.token, label="fuzzer", max_size=None)
            self.viewer = await self.context.__aenter__()
        return self.viewer

    async def drop(self) -> None:
        if self.context is not None:
            try:
                await self.context.__aexit__(None, None, None)
            except ConnectionClosed:
                pass
        self.viewer, self.context = None, None

    async def until_pong_or_close(self, v: Viewer, pongs: int) -> tuple[list[Event], int | None, bool]:
        """Events up to the answer to our ping (the `pongs`th pong), or up to the close:
        (events, close code, closed)."""
        taken: list[Event] = []
        await v.send({"type": "ping"})
        while True:
            try:
                event = await v.expect(lambda e: True, timeout=10, what="any event")
            except ConnectionClosed as exc:
                return taken, exc.rcvd.code if exc.rcvd else None, True
            taken.append(event)
            if event["type"] == "pong":
                pongs -= 1
                if pongs == 0:
                    return taken, None, False


def classify(data: str | bytes) -> str:
    """What the protocol says about a frame: too_big, binary, bad, chat_ok, chat_bad_text, like, ping."""
    size = len(data.encode() if isinstance(data, str) else data)
    if size > MAX_FRAME:
        return "too_big"
    if isinstance(data, bytes):
        return "binary"
    try:
        msg = protocol.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return "bad"
    if isinstance(msg, protocol.ChatIn):
        return "chat_ok" if 1 <= len(clean(msg.text)) <= protocol.MAX_TEXT_CHARS else "chat_bad_text"
    return "like" if isinstance(msg, protocol.LikeIn) else "ping"


@pytest.fixture(scope="module")
async def fuzz(server: ServerProcess) -> AsyncIterator[Fuzz]:
    async with api_client(server.url) as api:
        host = await register(api, "host")
        room = await create_room(api, host, title="Fuzzed")
        sender = await guest(api, "Fuzzer")
        watcher = await guest(api, "Bystander")
    log = LogWindow(server)
    async with open_viewer(server.url, room["id"], watcher.token, label="bystander") as bv:
        bystander = Bystander(bv)
        bystander.task = asyncio.create_task(bystander.drain())
        f = Fuzz(server, room["id"], sender.token, bystander, log)
        try:
            yield f
        finally:
            await f.drop()
            bystander.task.cancel()
            await asyncio.gather(bystander.task, return_exceptions=True)


# --- generated frames ---------------------------------------------------------------------------------

TEXT = st.text(st.characters(codec="utf-8"), max_size=60)
JSON_LEAF = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | TEXT
JSON = st.recursive(JSON_LEAF, lambda inner: st.lists(inner, max_size=5) | st.dictionaries(TEXT, inner, max_size=5),
                    max_leaves=20)
TYPED = st.fixed_dictionaries(
    {"type": st.sampled_from(["chat", "like", "ping", "pong", "welcome", "dance", "", "CHAT", "chat "]) | JSON},
    optional={"text": TEXT | JSON | st.text(max_size=300), "count": st.integers(-5, 60) | JSON, "extra": JSON})


def nested(n: int, open_: str = "[", close: str = "]") -> str:
    return open_ * n + close * n


FRAMES = st.one_of(
    JSON.map(json.dumps),
    TYPED.map(lambda d: json.dumps(d, ensure_ascii=False)),
    TYPED.map(json.dumps).map(lambda s: s[:-1]),                                  # cut short
    st.text(st.characters(codec="utf-8"), max_size=400),                          # any text at all
    st.binary(max_size=400),                                                      # binary frames
    st.integers(1, MAX_FRAME // 2).map(nested),                                   # deep nesting within 4 KiB
    st.integers(1, (MAX_FRAME - 30) // 2).map(lambda n: '{"type":"chat","text":' + nested(n) + "}"),
    st.integers(1, (MAX_FRAME - 30) // 6).map(lambda n: '{"type":"chat","x":' + '{"a":' * n + "0" + "}" * n + "}"),
    st.integers(MAX_FRAME + 1, 4 * MAX_FRAME).map(lambda n: json.dumps({"type": "chat", "text": "x" * n})),
    st.just(nested(10_000)),                                                      # 10k nested arrays: over 4 KiB
    st.integers(0, 60).map(lambda n: json.dumps({"type": "chat", "text": "\u200b" * n + " \t\n" * n})),
)


async def check_frame(fuzz: Fuzz, data: str | bytes) -> None:
    kind = classify(data)
    v = await fuzz.connect()
    fuzz.frames += 1
    await v.send(data)
    if kind == "too_big":
        events, close = await v.expect_close(timeout=10)
        assert [e for e in events if e["type"] == "error"] == [], events
        assert close is not None and close.code == 1009, close
        fuzz.closes[1009] = fuzz.closes.get(1009, 0) + 1
        await fuzz.drop()
        return
    events, code, closed = await fuzz.until_pong_or_close(v, 2 if kind == "ping" else 1)
    errors = [e for e in events if e["type"] == "error"]
    assert {e["code"] for e in errors} <= SENDER_ERRORS, errors
    for e in errors:
        assert isinstance(e["message"], str) and e["message"], e
    expected = {"binary": {"binary_frame"}, "bad": {"malformed_json", "invalid_message"},
                "chat_bad_text": {"invalid_text"}}.get(kind)
    if expected is not None:
        # A bad frame is always answered (and the answer is sent before any close it earned).
        assert errors and errors[0]["code"] in expected, (kind, events, code)
    if kind in ("like", "ping"):
        assert errors == [], (kind, errors)
    if closed:
        assert code in ABUSE_CLOSES, (kind, code, events)
        fuzz.closes[code] = fuzz.closes.get(code, 0) + 1
        await fuzz.drop()


def make_fuzz(examples: int) -> Any:
    @settings(max_examples=examples, deadline=None, database=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    @given(data=FRAMES)
    async def fuzz_frames(fuzz: Fuzz, data: str | bytes) -> None:
        await check_frame(fuzz, data)

    return fuzz_frames


test_every_frame_gets_an_answer_and_the_server_stays_up = make_fuzz(100)
test_every_frame_gets_an_answer_soak = pytest.mark.slow(make_fuzz(2000))


async def test_the_bystander_noticed_nothing_and_the_server_is_healthy(fuzz: Fuzz, server: ServerProcess) -> None:
    """Runs after the fuzz (file order): the other viewer of the room got no error and no close, and
    still gets the room's chat; the server answers and logged no unhandled error."""
    if fuzz.frames == 0:
        pytest.skip("checks what the fuzz test above left behind; run them together")
    b = fuzz.bystander
    assert b.task is not None and not b.task.done(), "the bystander's socket was closed"
    async with open_viewer(server.url, fuzz.room_id, label="after") as after:
        text = tag("after-fuzz")
        sender = await fuzz.connect()
        await sender.chat(text)
        await after.expect(chat_text(text), timeout=10)

        async def bystander_got_it() -> bool:
            return any(e.get("type") == "chat" and e.get("text") == text for e in b.events)

        for _ in range(100):
            if await bystander_got_it():
                break
            await asyncio.sleep(0.1)
        assert await bystander_got_it(), "the bystander did not get the chat sent after the fuzz"
    assert [e for e in b.events if e["type"] == "error"] == []
    assert {e["type"] for e in b.events} <= {"chat", "likes", "viewers"}, {e["type"] for e in b.events}
    async with api_client(server.url, timeout=10) as c:
        r = await c.get("/healthz")
        assert r.status_code == 200, r.text
    fuzz.log.assert_clean()


# --- frames that break the WebSocket framing (RFC 6455), written by hand ---------------------------------

def text(payload: bytes, **kw: Any) -> bytes:
    return frame(OP_TEXT, payload, **kw)


BROKEN_FRAMING: list[tuple[str, bytes, set[int | None]]] = [
    # name, bytes on the wire, acceptable close codes (None: the connection dropped without one)
    ("unmasked client frame", text(b'{"type":"ping"}', mask=False), {1002}),
    ("RSV1 without an extension", text(b'{"type":"ping"}', rsv=4), {1002}),
    ("reserved data opcode 0x3", frame(0x3, b"x"), {1002}),
    ("reserved control opcode 0xB", frame(0xB, b""), {1002}),
    ("control frame over 125 bytes", frame(OP_PING, b"p" * 126), {1002}),
    ("fragmented control frame", frame(OP_PING, b"p", fin=False), {1002}),
    ("continuation without a start", frame(OP_CONT, b"x"), {1002}),
    ("new message inside a fragmented one", text(b'{"type":', fin=False) + text(b'"ping"}'), {1002}),
    ("close code 999", frame(OP_CLOSE, struct.pack("!H", 999)), {1002}),
    ("close with a 1-byte payload", frame(OP_CLOSE, b"\x03"), {1002}),
    ("declared length of 2^40 bytes", text(b"", declared_len=1 << 40), {1009}),
    ("fragments adding up to over 4 KiB", text(b"[" * 3000, fin=False) + frame(OP_CONT, b"]" * 3000), {1009}),
    ("binary fragments adding up to over 4 KiB", frame(OP_BINARY, b"\x00" * 3000, fin=False)
     + frame(OP_CONT, b"\x00" * 3000), {1009}),
]


@pytest.fixture(scope="module")
async def framing_room(server: ServerProcess) -> dict[str, Any]:
    async with api_client(server.url) as api:
        host = await register(api, "host")
        room = await create_room(api, host, title="Framing")
        return {"room": room, "user": await guest(api, "Framer")}


@pytest.fixture
async def watcher_token(server: ServerProcess) -> str:
    """A fresh account per test, so its chat never meets the per-user rate limit."""
    async with api_client(server.url) as api:
        return str((await guest(api, "Watcher")).token)


@pytest.mark.parametrize(("name", "wire", "codes"), BROKEN_FRAMING, ids=[n for n, _, _ in BROKEN_FRAMING])
async def test_broken_framing_is_closed_and_harms_nobody_else(server: ServerProcess, framing_room: dict[str, Any],
                                                            watcher_token: str, name: str, wire: bytes,
                                                            codes: set[int | None]) -> None:
    log = LogWindow(server)
    room_id = framing_room["room"]["id"]
    async with open_viewer(server.url, room_id, watcher_token, label="watcher") as watcher:
        raw = await RawSocket.open(server.port, room_id, {"Authorization": f"Bearer {framing_room['user'].token}"})
        try:
            opcode, payload = await raw.read_frame() or (None, b"")
            assert opcode == OP_TEXT and json.loads(payload)[0]["type"] == "welcome", payload
            await raw.send(wire)
            texts, code = await raw.close_code()
        finally:
            await raw.aclose()
        assert code in codes, (name, code, texts)
        assert not any(b'"error"' in t for t in texts), texts
        # The room goes on for everyone else.
        await watcher.chat(f"after {name}")
        await watcher.expect(chat_text(f"after {name}"))
        assert [e for e in watcher.seen if e["type"] == "error"] == []
    async with api_client(server.url, timeout=10) as c:
        assert (await c.get("/healthz")).status_code == 200
    log.assert_clean()


async def test_a_message_split_into_fragments_is_put_back_together(server: ServerProcess,
                                                                   framing_room: dict[str, Any]) -> None:
    """Fragmentation is legal (RFC 6455 5.4), also with a multi-byte character cut between fragments."""
    room_id = framing_room["room"]["id"]
    raw = await RawSocket.open(server.port, room_id, {"Authorization": f"Bearer {framing_room['user'].token}"})
    try:
        await raw.read_frame()  # welcome
        body = json.dumps({"type": "chat", "text": "split 漢字 " + tag()}, ensure_ascii=False).encode()
        cut = body.index("漢".encode()) + 1  # inside the 3-byte character
        await raw.send(text(body[:cut], fin=False) + frame(OP_PING, b"mid") + frame(OP_CONT, body[cut:]))
        wanted = json.loads(body)["text"]
        for _ in range(20):
            got = await raw.read_frame()
            assert got is not None
            if got[0] == OP_TEXT and any(e.get("text") == wanted for e in json.loads(got[1])):
                break
        else:
            raise AssertionError("the fragmented chat never came back")
    finally:
        await raw.aclose()


# --- invalid UTF-8 in a text frame --------------------------------------------------------------------------

INVALID_UTF8 = [b"\xff", b'{"type":"chat","text":"\xc3"}', b'{"type":"chat","text":"\xed\xa0\x80"}',  # surrogate
                b'{"type":"ping"}\xf8\x88\x80\x80\x80']


@pytest.mark.parametrize("payload", INVALID_UTF8, ids=["0xff", "truncated", "surrogate", "5-byte"])
async def test_invalid_utf8_in_a_text_frame_is_closed_with_1007(server: ServerProcess, framing_room: dict[str, Any],
                                                                watcher_token: str, payload: bytes) -> None:
    """RFC 6455 8.1: invalid UTF-8 in a text message fails the connection with 1007. (docs/protocol.md
    lists only the application's close codes; 1002 and 1007 come from the WebSocket layer.)"""
    room_id = framing_room["room"]["id"]
    async with open_viewer(server.url, room_id, watcher_token, label="watcher") as watcher, \
            open_viewer(server.url, room_id, framing_room["user"].token, label="sender") as sender:
        await sender.ws.send(payload, text=True)  # websockets sends bytes as a text frame unchecked
        events, close = await sender.expect_close()
        assert [e for e in events if e["type"] == "error"] == [], events
        assert close is not None and close.code == 1007, close
        await watcher.chat("still fine")
        await watcher.expect(chat_text("still fine"))
    async with api_client(server.url, timeout=10) as c:
        assert (await c.get("/healthz")).status_code == 200


async def test_invalid_utf8_leaves_no_traceback_in_the_log(server: ServerProcess, framing_room: dict[str, Any]) -> None:
    log = LogWindow(server)
    async with open_viewer(server.url, framing_room["room"]["id"], framing_room["user"].token) as sender:
        await sender.ws.send(b"\xff", text=True)
        await sender.expect_close()
    for _ in range(50):  # the log line may trail the close a little
        if log.text():
            break
        await asyncio.sleep(0.1)
    log.assert_clean()
