"""A lean HTTP/1.1 keep-alive client on asyncio streams.

httpx costs more CPU per request than the server under test spends, so with
it the generator, not the server, would set the pace. This client does only
what the load needs: one request at a time per connection, JSON bodies,
Content-Length or chunked responses, reconnect on a dropped connection.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import msgspec

_json = msgspec.json.Encoder()
MAX_HEADER_BYTES = 64 * 1024


class HttpError(Exception):
    """The connection failed or the response could not be read (outcome unknown)."""


@dataclass(frozen=True)
class Target:
    host: str
    port: int
    authority: str  # the Host header

    @classmethod
    def parse(cls, url: str) -> Target:
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"only http:// URLs are supported, got {url!r}")
        port = parts.port or 80
        return cls(parts.hostname, port, f"{parts.hostname}:{port}")


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return msgspec.json.decode(self.body) if self.body else None

    @property
    def error_code(self) -> str:
        """The `error` field of an error body, or '' (never raises)."""
        try:
            data = msgspec.json.decode(self.body)
        except msgspec.DecodeError:
            return ""
        return str(data.get("error", "")) if isinstance(data, dict) else ""


def encode_request(method: str, path: str, authority: str, body: bytes | None,
                   headers: dict[str, str] | None) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {authority}", "Accept: application/json"]
    if body is not None:
        lines.append("Content-Type: application/json")
        lines.append(f"Content-Length: {len(body)}")
    elif method in ("POST", "PUT", "PATCH"):
        lines.append("Content-Length: 0")
    for k, v in (headers or {}).items():
        lines.append(f"{k}: {v}")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return head + body if body else head


class Connection:
    """One keep-alive connection, opened on first use and again after a failure."""

    def __init__(self, target: Target, connect_timeout: float = 10.0) -> None:
        self.target = target
        self.connect_timeout = connect_timeout
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self.connects = 0  # how many times it (re)connected

    async def _open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self._reader is None or self._writer is None or self._writer.is_closing():
            self._reader, self._writer = await asyncio.wait_for(
                asyncio.open_connection(self.target.host, self.target.port, limit=MAX_HEADER_BYTES),
                self.connect_timeout)
            self.connects += 1
        assert self._reader is not None and self._writer is not None
        return self._reader, self._writer

    async def request(self, method: str, path: str, *, json: Any = None, body: bytes | None = None,
                      headers: dict[str, str] | None = None, timeout: float = 10.0) -> Response:
        """Raises HttpError on a connection failure or timeout (the request may or may not have run)."""
        if json is not None:
            body = _json.encode(json)
        raw = encode_request(method, path, self.target.authority, body, headers)
        try:
            return await asyncio.wait_for(self._exchange(raw), timeout)
        except (TimeoutError, OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as exc:
            await self.close()
            raise HttpError(type(exc).__name__ if isinstance(exc, asyncio.TimeoutError) else repr(exc)) from None

    async def _exchange(self, raw: bytes) -> Response:
        reader, writer = await self._open()
        writer.write(raw)
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        status_line, *header_lines = head[:-4].decode("latin-1").split("\r\n")
        status = int(status_line.split(" ", 2)[1])
        headers: dict[str, str] = {}
        for line in header_lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if headers.get("transfer-encoding", "").lower() == "chunked":
            body = await self._read_chunked(reader)
        else:
            body = await reader.readexactly(int(headers.get("content-length", "0")))
        if headers.get("connection", "").lower() == "close":
            await self.close()
        return Response(status, headers, body)

    @staticmethod
    async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
        parts: list[bytes] = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0].strip(), 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                return b"".join(parts)
            parts.append(await reader.readexactly(size))
            await reader.readexactly(2)

    async def close(self) -> None:
        writer, self._reader, self._writer = self._writer, None, None
        if writer is not None:
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 1.0)


@dataclass
class Pool:
    """A few keep-alive connections shared by many callers (setup and checks, not the buyers)."""
    url: str
    size: int = 16
    target: Target = field(init=False)
    _free: asyncio.Queue[Connection] = field(init=False)
    _all: list[Connection] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        self.target = Target.parse(self.url)
        self._free = asyncio.Queue()
        for _ in range(self.size):
            conn = Connection(self.target)
            self._all.append(conn)
            self._free.put_nowait(conn)

    async def request(self, method: str, path: str, *, json: Any = None, token: str | None = None,
                      headers: dict[str, str] | None = None, timeout: float = 30.0, attempts: int = 3
                      ) -> Response:
        """Setup calls are idempotent reads or harmless on retry; retry connection failures briefly."""
        hdrs = dict(headers or {})
        if token:
            hdrs["Authorization"] = f"Bearer {token}"
        conn = await self._free.get()
        try:
            for attempt in range(attempts):
                try:
                    return await conn.request(method, path, json=json, headers=hdrs, timeout=timeout)
                except HttpError:
                    if attempt == attempts - 1:
                        raise
                    await asyncio.sleep(0.2 * (attempt + 1))
            raise AssertionError("unreachable")
        finally:
            self._free.put_nowait(conn)

    async def close(self) -> None:
        for conn in self._all:
            await conn.close()
