"""uvicorn's HTTP (httptools) and WebSocket (websockets, sans-I/O) protocols with the limits
uvicorn does not have: a deadline for a request's headers and body, a cap on the headers' size
and count, connections per address and per process, a bound on what a socket that is not read
may hold unsent, and a closing connection that the peer keeps open is aborted. Answers from
here are JSON like the app's (`{"error", "message"}`); docs/api.md lists them.

Chosen over h11 (which has a header-size cap) because httptools parses in C: the purchase
path's CPU is the product's ceiling. They build on uvicorn's internals (the parser callbacks,
`cycle`, `conn`), so pyproject.toml holds uvicorn to the minor they were checked against and
tests/backends/test_uvicorn_protocols.py fails, naming them, on another.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

import httptools
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.http11 import Response
from websockets.server import ServerProtocol

log = logging.getLogger("livesale.edge")

UVICORN_CHECKED = "0.55"

MAX_HEADER_BYTES = 16 * 1024  # request line and headers (nginx's and Node's order of size)
MAX_HEADERS = 100
HEADER_TIMEOUT_S = 10.0       # from the connect, or a request's first byte, to the end of its headers
BODY_TIMEOUT_S = 30.0         # from the end of the headers to the end of the body
KEEP_ALIVE_S = 5              # idle between requests (uvicorn's timeout_keep_alive)
WS_MAX_UNSENT_BYTES = 256 * 1024  # pongs and frames a socket that is not read may hold
CLOSE_GRACE_S = 3.0           # a closing connection still open after this long is aborted
REFUSE_AFTER_S = 1.0          # a refused connection that sends nothing is answered after this long


@dataclass(frozen=True)
class Limits:
    per_address: int = 1000
    per_process: int = 10_000
    exempt: frozenset[str] = frozenset()


class Slots:
    """The open connections of this process by peer address, keyed by transport: a WebSocket
    upgrade hands the transport to another protocol and keeps its slot. Once a second it runs
    the deadlines the protocols set (one timer for the process, not one per request: a timer
    per request cost the bare endpoint a tenth of its throughput), and resets connections that
    stay closing (the peer does not read what is left to send): a closed socket would
    otherwise keep its descriptor and buffer for as long as the peer likes."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.by_address: dict[str, int] = {}
        self.held: dict[asyncio.BaseTransport, str] = {}
        self.closing: dict[asyncio.BaseTransport, float] = {}
        self._reaper: asyncio.TimerHandle | None = None

    def take(self, transport: asyncio.Transport, address: str) -> tuple[int, str, str] | None:
        """Hold a slot, or the refusal (status, code, message)."""
        if len(self.held) >= self.limits.per_process:
            return 503, "unavailable", "the server holds as many connections as it can; try again shortly"
        if address not in self.limits.exempt:
            held = self.by_address.get(address, 0)
            if held >= self.limits.per_address:
                return 429, "too_many_connections", (f"this address holds {held} connections to this server; "
                                                     "close some before opening more")
            self.by_address[address] = held + 1
        self.held[transport] = address
        if self._reaper is None:
            self._reaper = asyncio.get_running_loop().call_later(1.0, self._reap)
        return None

    def release(self, transport: asyncio.BaseTransport) -> None:
        self.closing.pop(transport, None)
        address = self.held.pop(transport, None)
        if address is None or address in self.limits.exempt:
            return
        left = self.by_address[address] - 1
        if left:
            self.by_address[address] = left
        else:
            del self.by_address[address]

    def _reap(self) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        for transport in list(self.held):
            if not transport.is_closing():
                protocol = transport.get_protocol()
                if isinstance(protocol, HttpProtocol) and protocol.deadline_at and now >= protocol.deadline_at:
                    protocol.deadline_at = 0.0
                    protocol.on_deadline()
                continue
            since = self.closing.setdefault(transport, now)
            if now - since > CLOSE_GRACE_S:
                reset(transport)  # connection_lost releases it
        self._reaper = loop.call_later(1.0, self._reap) if self.held else None


SLOTS = Slots(Limits())


def reset(transport: asyncio.BaseTransport) -> None:
    """Abort with a TCP reset: the kernel drops what is unsent at once, rather than keep
    offering it to a peer that reads nothing (an orphaned socket in FIN-WAIT-1)."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()  # type: ignore[attr-defined]


def configure(limits: Limits) -> None:
    """Set this process's limits (a worker does, from its settings, before it serves)."""
    SLOTS.limits = limits


def error_body(code: str, message: str) -> bytes:
    return json.dumps({"error": code, "message": message}).encode()


def plain_response(status: int, code: str, message: str, *, retry_after: int | None = None) -> bytes:
    body = error_body(code, message)
    lines = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}", "content-type: application/json",
             f"content-length: {len(body)}", "connection: close"]
    if retry_after is not None:
        lines.append(f"retry-after: {retry_after}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


class HttpProtocol(HttpToolsProtocol):
    """httptools with deadlines, header caps and connection slots."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.refusal: tuple[int, str, str] | None = None
        self.done = False          # answered from here and closing: ignore what else comes
        self.in_headers = True     # between a request's first byte (or the connect) and its headers' end
        self.raw_bytes = 0         # received while in headers
        # When on_deadline runs (loop time; 0: never), checked by SLOTS once a second.
        self.deadline_at = 0.0
        self.on_deadline: Callable[[], None] = self._header_timeout

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.refusal = SLOTS.take(transport, self.client[0] if self.client else "")
        if self.refusal is not None:  # not held, so not in SLOTS' rounds: a timer of its own
            self.loop.call_later(REFUSE_AFTER_S, self._refuse)
        else:
            self._arm(HEADER_TIMEOUT_S, self._header_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        SLOTS.release(self.transport)
        super().connection_lost(exc)

    def _arm(self, delay: float, callback: Callable[[], None]) -> None:
        self.deadline_at = self.loop.time() + delay
        self.on_deadline = callback

    def _disarm(self) -> None:
        self.deadline_at = 0.0

    def _answer(self, status: int, code: str, message: str, *, retry_after: int | None = None) -> None:
        """Answer from here and close; the app never sees the request."""
        self._disarm()
        self.done = True
        if not self.transport.is_closing():
            self.transport.write(plain_response(status, code, message, retry_after=retry_after))
            self.transport.close()

    def _refuse(self) -> None:
        if self.done:
            return
        assert self.refusal is not None
        status, code, message = self.refusal
        self._answer(status, code, message, retry_after=1 if status == 503 else None)

    def _header_timeout(self) -> None:
        if self.raw_bytes == 0 and (self.cycle is None or self.cycle.response_complete):
            self.done = True
            self.transport.close()  # idle: nothing to answer
        else:
            self._answer(408, "request_timeout", f"the request's headers took over {HEADER_TIMEOUT_S:.0f} s")

    def _body_timeout(self) -> None:
        if self.cycle is not None and not self.cycle.response_started:
            self._answer(408, "request_timeout", f"the request's body took over {BODY_TIMEOUT_S:.0f} s")
        else:
            self.transport.close()

    def send_400_response(self, msg: str) -> None:
        self._answer(400, "bad_request", "invalid HTTP request")

    def data_received(self, data: bytes) -> None:
        if self.done:
            return
        if self.refusal is not None:
            self._refuse()  # its request has come: answer it (closing before reading it would reset)
            return
        self._unset_keepalive_if_required()
        if self.in_headers:
            self.raw_bytes += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self._disarm()
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return
        except httptools.HttpParserError:
            if not self.done:
                self.send_400_response("")
            return
        if self.in_headers and self.raw_bytes > MAX_HEADER_BYTES and not self.done:
            self._too_large()

    def _too_large(self) -> None:
        self._answer(431, "headers_too_large",
                     f"request headers are limited to {MAX_HEADER_BYTES} bytes and {MAX_HEADERS} fields")

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.in_headers = True
        self.raw_bytes = 0
        if not self.deadline_at:  # the first request's is armed at the connect
            self._arm(HEADER_TIMEOUT_S, self._header_timeout)

    def on_headers_complete(self) -> None:
        # Counted here, not per header (a call per header cost more): what one chunk can bring
        # past the limits before this check is bounded by the raw count in data_received.
        self.in_headers = False
        self._disarm()
        headers = self.headers
        if len(headers) > MAX_HEADERS or \
                len(self.url) + sum(len(n) + len(v) for n, v in headers) + 4 * len(headers) > MAX_HEADER_BYTES:
            self._too_large()
            raise _Answered  # stops the parser; data_received sees `done`
        super().on_headers_complete()
        self._arm(BODY_TIMEOUT_S, self._body_timeout)

    def on_message_complete(self) -> None:
        self._disarm()
        super().on_message_complete()


class _Answered(Exception):
    pass


class _JsonRejects(ServerProtocol):
    """websockets' handshake refusals as JSON, like every other answer."""

    def reject(self, status: Any, text: str) -> Response:
        response = super().reject(status, text)
        status = HTTPStatus(response.status_code)
        body = error_body(status.name.lower(), text.strip() or status.phrase)
        for name in ("Content-Type", "Content-Length"):  # Headers is a multi-dict: setting would add
            del response.headers[name]
        response.headers["Content-Type"] = "application/json"
        response.headers["Content-Length"] = str(len(body))
        return dataclasses.replace(response, body=body)


class WebSocketProtocol(WebSocketsSansIOProtocol):
    """websockets (sans-I/O) with a bound on what it holds unsent: a peer that sends pings and
    does not read the pongs (or anything else) is cut off; its slot is released when it goes."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        assert not self.config.ws_per_message_deflate  # the handshake would not offer it
        self.conn = _JsonRejects(max_size=self.config.ws_max_size, logger=logging.getLogger("uvicorn.error"))

    def connection_lost(self, exc: Exception | None) -> None:
        SLOTS.release(self.transport)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.transport.get_write_buffer_size() > WS_MAX_UNSENT_BYTES:
            log.info("%s: cut off, %d bytes unsent", self.client[0] if self.client else "?",
                     self.transport.get_write_buffer_size())
            reset(self.transport)
