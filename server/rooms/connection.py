"""The WebSocket endpoint /ws/rooms/{room_id}: handshake checks, then a reader
and a writer task per connection until either ends."""

from __future__ import annotations

import asyncio
import logging
import time

import msgspec
from redis.exceptions import RedisError
from sqlalchemy.exc import SQLAlchemyError
from starlette.websockets import WebSocket, WebSocketDisconnect

from server.auth import authenticate
from server.clock import from_ms, iso
from server.errors import ApiError
from server.ids import new_id
from server.metrics import REFUSED
from server.origins import origin_allowed, own_origin
from server.ratelimit import CHAT, address_key
from server.rooms import protocol
from server.rooms.hub import Close, Connection
from server.services import Services
from server.text import clean, folded, visible

log = logging.getLogger("livesale.rooms.connection")

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
        await _refuse(ws, protocol.TRY_AGAIN_LATER, "too_many_connections",
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
    except (RedisError, SQLAlchemyError):
        await _refuse(ws, protocol.TRY_AGAIN_LATER, "unavailable", UNAVAILABLE)
        return
    if meta is None:
        await _refuse(ws, protocol.ROOM_NOT_FOUND, "room_not_found", "no such room")
        return
    await ws.accept()
    conn = Connection(room_id, principal, is_host=principal is not None and principal.user_id == meta["host"]["id"])
    try:
        try:
            await hub.join(conn)
            if principal is not None and await services.sessions.is_revoked(principal.session_id):
                # Logged out after it was authenticated and before it joined: the logout's
                # message found no socket to close.
                await ws.close(protocol.SESSION_ENDED, "logged out")
                return
            meta = await hub.welcome(conn)
        except (asyncio.TimeoutError, OSError, ConnectionError, RedisError, SQLAlchemyError) as exc:
            log.warning("join failed for room %s: %r", room_id, exc)
            await ws.send_text(protocol.error_frame("unavailable", UNAVAILABLE))
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
            _bad(conn, "binary_frame", "send JSON as text frames")
            continue
        try:
            msg = protocol.decode(text)
        except msgspec.ValidationError as exc:
            _bad(conn, "invalid_message", str(exc))
            continue
        except msgspec.DecodeError:
            _bad(conn, "malformed_json", "a frame must be one JSON object")
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
                await _chat(conn, msg, services)
            except RedisError:
                _error(conn, "unavailable", "chat is unavailable for a moment; try again")


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
        _bad(conn, "login_required", "sign in to like")
        return
    services.hub.add_likes(conn.room_id, conn.principal.user_id, msg.count)


async def _chat(conn: Connection, msg: protocol.ChatIn, services: Services) -> None:
    p = conn.principal
    if p is None:
        _bad(conn, "login_required", "sign in to chat")
        return
    text = clean(msg.text)
    if not visible(text) or len(text) > protocol.MAX_TEXT_CHARS:
        _bad(conn, "invalid_text", f"a message has 1 to {protocol.MAX_TEXT_CHARS} characters")
        return
    wait = await services.limiter.hit(CHAT, p.user_id)
    if wait:
        _error(conn, "rate_limited", "slow down: at most 2 messages a second", int(wait * 1000))
        if conn.strike():
            conn.close(protocol.POLICY, "chat too fast")
        return
    hub, store = services.hub, services.hub.store
    user = protocol.UserRef(id=p.user_id, name=p.name)
    now_ms = int(time.time() * 1000)
    if not conn.is_host:
        as_filtered = folded(text)
        if any(word in as_filtered for word in await hub.banned_words(conn.room_id)):
            _bad(conn, "banned_word", "your message contains a word this room does not allow")
            await services.rooms.tell_host(conn.room_id, protocol.ChatRejected(
                user=user, text=text, reason="banned_word", ts=now_ms))
            return
    event = protocol.Chat(id=new_id("msg"), user=user, text=text, ts=now_ms)
    muted_until = await store.post_chat(conn.room_id, event.id, p.user_id, protocol.encode(event))
    if muted_until is not None:
        _bad(conn, "muted", f"the host muted you until {iso(from_ms(muted_until))}")
        await services.rooms.tell_host(conn.room_id, protocol.ChatRejected(
            user=user, text=text, reason="muted", ts=now_ms))
