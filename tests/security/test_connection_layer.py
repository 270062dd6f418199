"""The connection layer under the app (server/backends/uvicorn_protocols.py), attacked from one
address on plain TCP sockets: peers that send nothing, trickle headers, send too many or too
large headers, flood pings without reading the pongs, hold too many connections, or speak
something else than HTTP/1.1. Each gets a bounded, clear answer (JSON) or is cut off, and the
process's memory and descriptors stay bounded. docs/reliability.md lists the limits."""

from __future__ import annotations

import base64
import json
import resource
import secrets
import shutil
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from load.servers import healthy, rss_kib
from server.backends.open_files import SPARE
from server.backends.sql import POOL_MAX
from server.backends.uvicorn_protocols import (
    HEADER_TIMEOUT_S,
    KEEP_ALIVE_S,
    MAX_HEADER_BYTES,
    MAX_HEADERS,
    WS_MAX_UNSENT_BYTES,
)
from tests.reliability.support import OP_PING, LogWindow, frame
from tests.support import ServerProcess, api_client, create_room, register

pytestmark = pytest.mark.reliability

PER_ADDRESS = 40
MB = 1024 * 1024


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> Iterator[ServerProcess]:
    """Loopback is not exempt here: the per-address cap applies to this test's connections."""
    env = {"LIVESALE_RATE_LIMIT_EXEMPT_IPS": "", "LIVESALE_MAX_CONNECTIONS_PER_ADDRESS": str(PER_ADDRESS),
           "LIVESALE_ALLOWED_HOSTS": "127.0.0.1,LiveSale.Example"}
    with ServerProcess(tmp_path_factory.mktemp("edge"), redis_url=redis_url, env=env) as s:
        yield s


@pytest.fixture(scope="module")
def log(srv: ServerProcess) -> LogWindow:
    return LogWindow(srv)


@pytest.fixture(scope="module")
async def room_id(srv: ServerProcess, log: LogWindow) -> str:
    async with api_client(srv.url) as api:
        return str((await create_room(api, await register(api)))["id"])


def connect(port: int, rcvbuf: int | None = None) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)  # before connect: a small window
    sock.settimeout(10)
    sock.connect(("127.0.0.1", port))
    return sock


def read_response(sock: socket.socket, timeout: float = 10.0) -> tuple[int, dict[str, str], bytes]:
    """One HTTP response: status, headers (lower-case names), body (by Content-Length, else to EOF)."""
    sock.settimeout(timeout)
    data = b""
    try:
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    except ConnectionResetError:
        pass
    assert b"\r\n\r\n" in data, f"no response, got {data[:200]!r}"
    head, body = data.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    length = int(headers.get("content-length", "-1"))
    try:
        while length >= 0 and len(body) < length:
            chunk = sock.recv(65536)
            if not chunk:
                break
            body += chunk
    except ConnectionResetError:
        pass
    return int(lines[0].split()[1]), headers, body


def request(path: str = "/healthz", *extra: str) -> bytes:
    return ("\r\n".join([f"GET {path} HTTP/1.1", "Host: 127.0.0.1", *extra]) + "\r\n\r\n").encode()


def assert_json_error(status: int, headers: dict[str, str], body: bytes, want: int, code: str) -> None:
    assert status == want, (status, body)
    assert headers["content-type"] == "application/json"
    doc = json.loads(body)
    assert doc["error"] == code and doc["message"], doc


def closed_by_server(sock: socket.socket, timeout: float) -> bool:
    """The server ended the connection (EOF or reset) within `timeout`, reading what it sent."""
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
        return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def websocket(port: int, room_id: str, rcvbuf: int | None = None) -> socket.socket:
    sock = connect(port, rcvbuf)
    key = base64.b64encode(secrets.token_bytes(16)).decode()
    sock.sendall(request(f"/ws/rooms/{room_id}", "Upgrade: websocket", "Connection: Upgrade",
                         f"Sec-WebSocket-Key: {key}", "Sec-WebSocket-Version: 13"))
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(1)
        assert chunk, head
        head += chunk
    assert b" 101 " in head.split(b"\r\n", 1)[0], head
    return sock


# --- 1. a ping flood that reads nothing ---------------------------------------------------------------------

def test_a_socket_that_sends_pings_and_reads_none_of_the_pongs_is_cut_off(srv: ServerProcess, room_id: str) -> None:
    before = rss_kib(srv.app_pids()[0])
    sock = websocket(srv.port, room_id, rcvbuf=4096)
    chunk = frame(OP_PING, b"p" * 125) * 100  # 13 KB of pings, each answered by a 127-byte pong
    sent, cut_off = 0, False
    deadline = time.monotonic() + 60
    try:
        while sent < 64 * MB and time.monotonic() < deadline:
            sock.sendall(chunk)
            sent += len(chunk)
    except (ConnectionResetError, BrokenPipeError, TimeoutError):
        cut_off = True
    finally:
        sock.close()
    grown = rss_kib(srv.app_pids()[0]) - before
    assert cut_off, f"still connected after {sent // MB} MB of pings"
    # What it got to send: the unsent-bytes bound plus the kernel's buffers on both sides (loopback
    # autotunes the server's send buffer up to tcp_wmem's maximum, 4 MiB by default).
    assert sent < 12 * MB, sent
    assert grown < 8 * 1024, f"the server grew by {grown} KiB"
    assert WS_MAX_UNSENT_BYTES <= 256 * 1024


# --- 2. silent, slow and idle connections -------------------------------------------------------------------

def test_silent_slow_header_and_idle_connections_are_closed(srv: ServerProcess) -> None:
    silent = [connect(srv.port) for _ in range(20)]
    slow = connect(srv.port)
    idle = connect(srv.port)
    try:
        idle.sendall(request())
        status, _, _ = read_response(idle)
        assert status == 200
        started = time.monotonic()

        def trickle() -> tuple[int, dict[str, str], bytes]:
            slow.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            for i in range(int(HEADER_TIMEOUT_S) + 10):  # one header line a second, never the end
                try:
                    slow.sendall(f"X-Slow-{i}: 1\r\n".encode())
                except OSError:
                    break
                time.sleep(1)
                if time.monotonic() - started > HEADER_TIMEOUT_S + 3:
                    break
            return read_response(slow)

        with ThreadPoolExecutor(4) as pool:
            idle_closed = pool.submit(closed_by_server, idle, KEEP_ALIVE_S + 4)
            slow_answer = pool.submit(trickle)
            silent_closed = [pool.submit(closed_by_server, s, HEADER_TIMEOUT_S + 6) for s in silent]
            assert idle_closed.result(), "an idle keep-alive connection stayed open"
            assert time.monotonic() - started < KEEP_ALIVE_S + 4
            assert_json_error(*slow_answer.result(), 408, "request_timeout")
            assert all(f.result() for f in silent_closed), "a connection that sent nothing stayed open"
        assert time.monotonic() - started < HEADER_TIMEOUT_S + 8
    finally:
        for s in (*silent, slow, idle):
            s.close()


# --- 3. headers past the limits -----------------------------------------------------------------------------

def test_headers_within_the_limits_are_served(srv: ServerProcess) -> None:
    n = MAX_HEADERS - 5
    value = "v" * ((MAX_HEADER_BYTES - 500) // n - 12)
    with connect(srv.port) as sock:
        sock.sendall(request("/healthz", *(f"X-H{i:03}: {value}" for i in range(n))))
        assert read_response(sock)[0] == 200


@pytest.mark.parametrize("shape", ["many", "one_huge", "endless"])
def test_headers_past_the_limits_get_431_and_the_rest_is_not_read(srv: ServerProcess, shape: str) -> None:
    before = rss_kib(srv.app_pids()[0])
    if shape == "many":  # 20,000 small headers
        payload = request("/healthz", *(f"X-{i}: a" for i in range(20_000)))
    elif shape == "one_huge":  # 8 MB in one header
        payload = request("/healthz", "X-Big: " + "b" * (8 * MB))
    else:  # header lines without end: 100 MB if the server kept reading
        payload = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n" + b"".join(
            b"X-Pile-%d: %s\r\n" % (i, b"c" * 1000) for i in range(100 * 1024))
    sock = connect(srv.port)
    sent = 0

    def send() -> None:
        nonlocal sent
        try:
            for i in range(0, len(payload), 65536):
                sock.sendall(payload[i:i + 65536])
                sent += 65536
        except OSError:
            return

    try:
        with ThreadPoolExecutor(1) as pool:
            sending = pool.submit(send)
            answer = read_response(sock, timeout=20)
            sending.result(timeout=30)
    finally:
        sock.close()
    assert_json_error(*answer, 431, "headers_too_large")
    assert sent < 16 * MB, sent
    assert rss_kib(srv.app_pids()[0]) - before < 8 * 1024


# --- 12. malformed HTTP ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("raw", [
    b"NOT A REQUEST LINE\r\n\r\n",
    b"POST /api/auth/login HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: banana\r\n\r\n",
    b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nBad Header\r\n\r\n",
], ids=["request_line", "content_length", "http2_preface", "header_line"])
def test_malformed_http_is_answered_400_in_json(srv: ServerProcess, raw: bytes) -> None:
    with connect(srv.port) as sock:
        sock.sendall(raw)
        assert_json_error(*read_response(sock), 400, "bad_request")


def test_a_websocket_handshake_the_library_refuses_is_answered_in_json(srv: ServerProcess, room_id: str) -> None:
    with connect(srv.port) as sock:
        sock.sendall(request(f"/ws/rooms/{room_id}", "Upgrade: websocket", "Connection: Upgrade",
                             "Sec-WebSocket-Version: 13"))  # no Sec-WebSocket-Key
        assert_json_error(*read_response(sock), 400, "bad_request")


# --- 10. the Host header -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("host", ["127.0.0.1", "livesale.example:8443", "LIVESALE.EXAMPLE"])
def test_allowed_hosts_are_served_and_slash_redirects_are_relative(srv: ServerProcess, host: str) -> None:
    with connect(srv.port) as sock:
        sock.sendall(b"GET /api/rooms/?limit=5 HTTP/1.1\r\nHost: " + host.encode() + b"\r\n\r\n")
        status, headers, _ = read_response(sock)
    assert status == 307 and headers["location"] == "/api/rooms?limit=5", headers


@pytest.mark.parametrize("host", ["evil.example", "127.0.0.1.evil.example", "", "livesale.example.evil.io"])
def test_other_hosts_get_400_on_http_and_sockets(srv: ServerProcess, room_id: str, host: str) -> None:
    with connect(srv.port) as sock:
        sock.sendall(b"GET /api/rooms/ HTTP/1.1\r\nHost: " + host.encode() + b"\r\n\r\n")
        assert_json_error(*read_response(sock), 400, "bad_host")
    with connect(srv.port) as sock:
        key = base64.b64encode(secrets.token_bytes(16)).decode()
        sock.sendall(f"GET /ws/rooms/{room_id} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\n"
                     f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
                     .encode())
        assert read_response(sock)[0] == 403


def test_a_path_that_would_redirect_off_site_is_not_redirected(srv: ServerProcess) -> None:
    with connect(srv.port) as sock:
        sock.sendall(request("//evil.example/"))
        status, headers, _ = read_response(sock)
    assert status == 404 and "location" not in headers


# --- 2. connections per address and per process ----------------------------------------------------------------

def test_one_address_holds_at_most_its_share_of_http_and_websocket_connections(srv: ServerProcess,
                                                                             room_id: str) -> None:
    held: list[socket.socket] = []
    try:
        held += [websocket(srv.port, room_id) for _ in range(PER_ADDRESS // 2)]
        for _ in range(PER_ADDRESS - len(held)):
            sock = connect(srv.port)
            sock.sendall(request())  # a keep-alive connection, answered and kept
            assert read_response(sock)[0] == 200
            held.append(sock)
        with connect(srv.port) as extra:
            extra.sendall(request())
            assert_json_error(*read_response(extra), 429, "too_many_connections")
        held.pop(0).close()  # one socket less: room for one more
        deadline = time.monotonic() + 10
        while True:
            with connect(srv.port) as again:
                again.sendall(request())
                status = read_response(again)[0]
            if status == 200 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert status == 200
    finally:
        for s in held:
            s.close()


def test_a_process_holds_at_most_its_connections_whatever_the_address(tmp_path: Path, redis_url: str) -> None:
    """Loopback is exempt from the per-address cap here, not from the per-process one."""
    with ServerProcess(tmp_path, redis_url=redis_url, env={"LIVESALE_MAX_CONNECTIONS": "30"}) as small:
        held = []
        try:
            for _ in range(30):
                sock = connect(small.port)
                sock.sendall(request())
                assert read_response(sock)[0] == 200
                held.append(sock)
            with connect(small.port) as extra:
                extra.sendall(request())
                status, headers, body = read_response(extra)
            assert_json_error(status, headers, body, 503, "unavailable")
            assert headers["retry-after"] == "1"
        finally:
            for s in held:
                s.close()


# --- 5. the open-file limit ---------------------------------------------------------------------------------------

@pytest.mark.skipif(shutil.which("prlimit") is None, reason="needs util-linux's prlimit")
def test_under_a_1024_open_file_limit_a_crowd_from_one_address_is_refused_and_the_server_stays_up(
        tmp_path: Path, redis_url: str) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < 1400:
        pytest.skip(f"this process may open only {hard} files")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1400), hard))
    small = ServerProcess(tmp_path, redis_url=redis_url, env={"LIVESALE_RATE_LIMIT_EXEMPT_IPS": ""})
    small.argv = ["prlimit", "--nofile=1024:1024", *small.argv]
    with small:
        cap = 1024 - 64 - POOL_MAX - SPARE  # LIVESALE_REDIS_MAX_CONNECTIONS is 64
        assert f"the open-file limit (1024) holds {cap} connections per process" in small.log()
        crowd: list[socket.socket] = []
        try:
            for _ in range(1000):  # as many as one address is allowed by default, sending nothing
                crowd.append(connect(small.port))
            with connect(small.port) as other:  # a refusal that says why, not a silent failure
                other.sendall(request())
                assert_json_error(*read_response(other), 503, "unavailable")
            refused = 0
            for s in crowd[cap:]:
                refused += closed_by_server(s, 5)
            assert refused == len(crowd) - cap
        finally:
            for s in crowd:
                s.close()
        deadline = time.monotonic() + 10
        while not healthy(small.url) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert healthy(small.url)
        assert "Too many open files" not in small.log(200_000)


def test_the_server_logged_no_unhandled_error(log: LogWindow) -> None:
    log.assert_clean()
