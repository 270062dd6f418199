"""The WebSocket endpoint /ws/rooms/{room_id}: handshake checks, then a reader
and a writer task per connection until either ends. The room layer decides; this
module maps its answers to frames, `error` events and close codes."""

from __future__ import annotations

import asyncio
import logging
import time

import msgspec
from sqlalchemy.exc import SQLAlchemyError
from starlette.websockets import WebSocket, WebSocketDisconnect

from server.auth import authenticate
from server.backends.redis_client import REDIS_ERRORS
from server.errors import ApiError
from server.metrics import REFUSED
from server.origins import origin_allowed, own_origin
from server.ratelimit import address_key
from server.rooms import protocol
from server.rooms.connection import Close, Connection
from server.wiring import Services

log = logging.getLogger("livesale.api.room_socket")

UNAVAILABLE = "the room is unavailable, reconnect shortly"


async def _refuse(ws: WebSocket, code: int, error: str, message: str) -> None:
    REFUSED.labels(error).inc()
    await ws.accept()
    await ws.send_text(protocol.error_frame(error, message))
    await ws.close(code, message)


async def room_socket(ws: WebSocket) -> None:
    services: Services = ws.app.state.services
    room_id = str(ws.path_params["room_id"])
    origin = ws.headers.get("origin")
    # Browsers always send Origin; refusing before accept() answers the handshake with 403.
    if origin is not None and not origin_allowed(origin, own_origin(ws.url.scheme, ws.headers),
                                                 services.settings.allowed_origins):
        await ws.close(protocol.POLICY)
        return
    ip = ws.client.host if ws.client else "unknown"
    address = None if ip in services.settings.rate_limit_exempt_ips else address_key(ip)
    if address is not None and not services.sockets.take(address):
        await _refuse(ws, protocol.TRY_AGAIN_LATER, protocol.TOO_MANY_CONNECTIONS,
                      f"at most {services.sockets.limit} open connections per address")
        return
    try:
        await _join(ws, services, room_id)
    finally:
        if address is not None:
            services.sockets.give_back(address)


async def _join(ws: WebSocket, services: Services, room_id: str) -> None:
    hub = services.hub
    try:
        principal = await authenticate(services.sessions, ws.headers, ws.cookies)
        meta = await hub.room_meta(room_id)
    except ApiError as exc:
        await _refuse(ws, protocol.SESSION_ENDED, exc.code, exc.message)
        return
    except (*REDIS_ERRORS, SQLAlchemyError):
        await _refuse(ws, protocol.TRY_AGAIN_LATER, protocol.UNAVAILABLE, UNAVAILABLE)
        return
    if meta is None:
        await _refuse(ws, protocol.ROOM_NOT_FOUND, protocol.ROOM_NOT_FOUND_ERROR, "no such room")
        return
    await ws.accept()
    conn = Connection(room_id, principal, is_host=principal is not None and principal.user_id == meta["host"]["id"],
                      queue_frames=services.settings.ws_queue_frames)
    try:
        try:
            await hub.join(conn)
            if principal is not None and await services.sessions.is_revoked(principal.session_id):
                # Logged out after it was authenticated and before it joined: the logout's
                # message found no socket to close.
                await ws.close(protocol.SESSION_ENDED, "logged out")
                return
            meta = await hub.welcome(conn)
        except (asyncio.TimeoutError, OSError, ConnectionError, *REDIS_ERRORS, SQLAlchemyError) as exc:
            log.warning("join failed for room %s: %r", room_id, exc)
            await ws.send_text(protocol.error_frame(protocol.UNAVAILABLE, UNAVAILABLE))
            await ws.close(protocol.TRY_AGAIN_LATER)
            return
        if meta["status"] == "ended":
            conn.close(protocol.NORMAL, "room ended")
        await _serve(ws, conn, services)
    finally:
        await hub.leave(conn)


async def _serve(ws: WebSocket, conn: Connection, services: Services) -> None:
    writer = conn.writer = asyncio.create_task(_write(ws, conn))
    reader = asyncio.create_task(_read(ws, conn, services))
    done, pending = await asyncio.wait({writer, reader}, return_when=asyncio.FIRST_COMPLETED)
    for task in pending:
        task.cancel()
    for task in (writer, reader):
        try:
            await task
        except (asyncio.CancelledError, WebSocketDisconnect):
            pass
        except Exception:
            log.exception("connection task failed")
    conn.writer = None  # a finished task holds its frames (and so the connection) through its result


async def _write(ws: WebSocket, conn: Connection) -> None:
    while True:
        item = await conn.queue.get()
        if isinstance(item, Close):
            try:
                await asyncio.wait_for(ws.close(item.code, item.reason), 2.0)
            except (asyncio.TimeoutError, RuntimeError, OSError):
                pass
            return
        conn.sending_since = time.monotonic()
        try:
            await ws.send_text(item)  # a stalled peer: the hub cancels this task, the server closes the transport
        finally:
            conn.sending_since = 0.0


async def _read(ws: WebSocket, conn: Connection, services: Services) -> None:
    while not conn.closed:
        message = await ws.receive()
        if message["type"] == "websocket.disconnect":
            return
        text = message.get("text")
        if text is None:
            _bad(conn, protocol.BINARY_FRAME, "send JSON as text frames")
            continue
        try:
            msg = protocol.decode(text)
        except msgspec.ValidationError as exc:
            _bad(conn, protocol.INVALID_MESSAGE, str(exc))
            continue
        except msgspec.DecodeError:
            _bad(conn, protocol.MALFORMED_JSON, "a frame must be one JSON object")
            continue
        if isinstance(msg, protocol.PingIn):
            if not conn.pings.take():
                conn.close(protocol.POLICY, "pings too fast")
                continue
            conn.offer(protocol.batch([protocol.encode(protocol.Pong(ts=int(time.time() * 1000)))]))
        elif isinstance(msg, protocol.LikeIn):
            _like(conn, msg, services)
        else:
            try:
                refusal = await services.rooms.post_chat(conn.room_id, conn.principal, conn.is_host, msg.text)
            except REDIS_ERRORS:
                _error(conn, protocol.UNAVAILABLE, "chat is unavailable for a moment; try again")
                continue
            if refusal is not None:
                _error(conn, refusal.code, refusal.message, refusal.retry_after_ms)
                if conn.strike():  # a refused message counts as a bad frame
                    conn.close(protocol.POLICY, "chat too fast" if refusal.code == protocol.RATE_LIMITED
                               else "too many invalid frames")


def _error(conn: Connection, code: str, message: str, retry_after_ms: int | None = None) -> None:
    conn.offer(protocol.error_frame(code, message, retry_after_ms))


def _bad(conn: Connection, code: str, message: str) -> None:
    """An invalid frame or a refused message: tell the sender; close if it keeps coming."""
    _error(conn, code, message)
    if conn.strike():
        conn.close(protocol.POLICY, "too many invalid frames")


def _like(conn: Connection, msg: protocol.LikeIn, services: Services) -> None:
    if not conn.likes_bucket.take():
        conn.close(protocol.POLICY, "likes too fast")
        return
    if conn.principal is None:
        _bad(conn, protocol.LOGIN_REQUIRED, "sign in to like")
        return
    services.hub.add_likes(conn.room_id, conn.principal.user_id, msg.count)
