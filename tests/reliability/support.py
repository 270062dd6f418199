"""Helpers for the reliability and security suites (tests/reliability/, tests/security/).

Everything here drives real parts: `livesale serve` subprocesses, Valkey engines, SQLite files,
WebSocket clients and raw TCP sockets, all on 127.0.0.1. Waiting is bounded polling; nothing
asserts how fast anything is.

The private servers of these suites use their own Redis database index of the session Valkey
(DB_PAIR, DB_SESSIONS, DB_HTTP, DB_PG_OUTAGE in tests/support.py's registry).
"""

from __future__ import annotations

import asyncio
import base64
import re
import secrets
import struct
from contextlib import asynccontextmanager
from pathlib import Path
from typing import AsyncIterator, Iterable

import httpx
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from load.servers import free_port
from server.backends.embedded_valkey import EmbeddedValkey
from server.inventory.reconcile import Report, reconcile
from server.inventory.stock import Stock
from tests.support import ServerProcess, api_client, eventually

# What must never appear in a server's log: an unhandled error anywhere.
LOG_ALARMS = ("Traceback", "Exception in ASGI application", "unhandled error")


# --- server logs, and a Valkey that can fail ------------------------------------------------------

class LogWindow:
    """The part of a server's log written since this object was made (the whole file, not the 5000
    characters ServerProcess.log() keeps)."""

    def __init__(self, srv: ServerProcess) -> None:
        self.path = srv.log_path
        self.offset = self.path.stat().st_size if self.path.exists() else 0

    def text(self) -> str:
        if not self.path.exists():
            return ""
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            return f.read().decode(errors="replace")

    def alarms(self) -> list[str]:
        """Lines that show an unhandled error (with a little context)."""
        lines = self.text().splitlines()
        return [" | ".join(lines[max(0, i - 1):i + 4]) for i, line in enumerate(lines)
                if any(a in line for a in LOG_ALARMS)]

    def assert_clean(self) -> None:
        alarms = self.alarms()
        assert alarms == [], "server log shows unhandled errors:\n" + "\n".join(alarms[:5])


class Engine:
    """A private Valkey on a fixed loopback port and data dir, that a test can stop, kill and start
    again (a new EmbeddedValkey on the same directory and port, which replays the append-only file)."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.port = free_port()
        self.current: EmbeddedValkey | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> str:
        self.current = EmbeddedValkey(self.data_dir, port=self.port)
        return self.current.start()

    def stop(self) -> None:
        """Graceful: SIGTERM; Valkey fsyncs its AOF and exits."""
        if self.current is not None:
            self.current.stop()
            self.current = None

    def kill(self) -> None:
        """SIGKILL, as a crash of the Redis process would."""
        if self.current is not None:
            self.current.kill()
            self.current = None

    @property
    def running(self) -> bool:
        return self.current is not None


# --- waiting --------------------------------------------------------------------------------------

async def wait_health(client: httpx.AsyncClient, status: int, *, timeout: float = 30.0) -> httpx.Response:
    async def check() -> httpx.Response | None:
        try:
            r = await client.get("/healthz", timeout=10)
        except httpx.HTTPError:
            return None
        return r if r.status_code == status else None

    response: httpx.Response = await eventually(check, timeout=timeout, interval=0.2, what=f"/healthz {status}")
    return response


async def wait_reconciled(stock: Stock, db: async_sessionmaker[AsyncSession], sale_id: str, *,
                          timeout: float = 30.0) -> Report:
    """Poll `reconcile` until SQL has caught up with Redis and agrees with it; return that report.

    Not tests/inventory/support.wait_persisted, which returns the first report with nothing left in
    the stream, agreeing or not: here a disagreement may be SQL still catching up after an outage.
    A real loss never reconciles, so polling for agreement still fails on one."""
    async def agreed() -> Report | None:
        report = await reconcile(stock, db, sale_id)
        return report if report.unpersisted == 0 and report.ok else None

    try:
        result: Report = await eventually(agreed, timeout=timeout, interval=0.2, what=f"SQL reconciled with {sale_id}")
    except AssertionError:
        last = await reconcile(stock, db, sale_id)
        raise AssertionError("SQL never agreed with Redis:\n" + "\n".join(last.lines())) from None
    return result


# --- raw WebSocket frames over TCP ---------------------------------------------------------------

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA


def frame(opcode: int, payload: bytes, *, fin: bool = True, mask: bool = True, rsv: int = 0,
          declared_len: int | None = None) -> bytes:
    """One WebSocket frame, built by hand so it can break the rules (RFC 6455 section 5.2)."""
    head = bytes([(0x80 if fin else 0) | (rsv & 0x7) << 4 | opcode])
    n = len(payload) if declared_len is None else declared_len
    mask_bit = 0x80 if mask else 0
    if n < 126:
        head += bytes([mask_bit | n])
    elif n < 1 << 16:
        head += bytes([mask_bit | 126]) + struct.pack("!H", n)
    else:
        head += bytes([mask_bit | 127]) + struct.pack("!Q", n)
    if not mask:
        return head + payload
    key = secrets.token_bytes(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


class RawSocket:
    """A WebSocket client on a plain TCP socket: handshake, then whatever bytes the test writes."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.buffer = b""

    @classmethod
    async def open(cls, port: int, room_id: str, headers: dict[str, str] | None = None) -> "RawSocket":
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 10)
        key = base64.b64encode(secrets.token_bytes(16)).decode()
        lines = [f"GET /ws/rooms/{room_id} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Upgrade: websocket",
                 "Connection: Upgrade", f"Sec-WebSocket-Key: {key}", "Sec-WebSocket-Version: 13"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        status = head.split(b"\r\n", 1)[0]
        assert b" 101 " in status, head
        return cls(reader, writer)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def read_frame(self, timeout: float = 10.0) -> tuple[int, bytes] | None:
        """The next frame from the server (opcode, payload), or None at EOF."""
        async def need(n: int) -> bool:
            while len(self.buffer) < n:
                chunk = await self.reader.read(65536)
                if not chunk:
                    return False
                self.buffer += chunk
            return True

        async def one() -> tuple[int, bytes] | None:
            if not await need(2):
                return None
            b0, b1 = self.buffer[0], self.buffer[1]
            n, pos = b1 & 0x7F, 2
            if n == 126:
                if not await need(4):
                    return None
                n, pos = struct.unpack("!H", self.buffer[2:4])[0], 4
            elif n == 127:
                if not await need(10):
                    return None
                n, pos = struct.unpack("!Q", self.buffer[2:10])[0], 10
            if not await need(pos + n):
                return None
            payload, self.buffer = self.buffer[pos:pos + n], self.buffer[pos + n:]
            return b0 & 0x0F, payload

        return await asyncio.wait_for(one(), timeout)

    async def close_code(self, timeout: float = 10.0) -> tuple[list[bytes], int | None]:
        """Read until the server's close frame or EOF: the text payloads seen, and the close code (None if
        the connection ended without a close frame)."""
        texts: list[bytes] = []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise AssertionError(f"no close within {timeout}s; got {texts!r}")
            try:
                got = await self.read_frame(remaining)
            except (ConnectionResetError, asyncio.IncompleteReadError):
                return texts, None
            if got is None:
                return texts, None
            opcode, payload = got
            if opcode == OP_CLOSE:
                return texts, struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None
            if opcode == OP_TEXT:
                texts.append(payload)

    async def aclose(self) -> None:
        self.writer.close()
        try:
            await asyncio.wait_for(self.writer.wait_closed(), 5)
        except (OSError, asyncio.TimeoutError):
            pass


# --- odds and ends ----------------------------------------------------------------------------------

def tokens_in(text: str, tokens: Iterable[str]) -> list[str]:
    """Which tokens (or their signature part, the last dot-separated piece) occur in `text`."""
    found = []
    for token in tokens:
        signature = token.rsplit(".", 1)[-1]
        if token in text or (len(signature) >= 16 and signature in text):
            found.append(token)
    return found


def access_lines(text: str) -> list[str]:
    """uvicorn access-log lines: `INFO: 127.0.0.1:PORT - "GET /path HTTP/1.1" 200 OK`."""
    return [line for line in text.splitlines() if re.search(r'"(GET|POST|PUT|PATCH|DELETE|HEAD|OPTIONS) ', line)]


@asynccontextmanager
async def clients(base_url: str, n: int) -> AsyncIterator[list[httpx.AsyncClient]]:
    """`n` HTTP clients, each with its own connection (a person with many tabs, devices or scripts)."""
    made = [api_client(base_url, connections=1) for _ in range(n)]
    try:
        yield made
    finally:
        await asyncio.gather(*(c.aclose() for c in made))
