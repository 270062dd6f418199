"""The room protocol, defined once: the WebSocket's messages (see docs/protocol.md) and the
messages between processes on a room's pub/sub channel.

Client -> server: one JSON object per text frame, with a `type`.
Server -> client: one JSON array of events per text frame (a tick's batch).
Process -> processes: one audience byte, then an event's JSON (or a control message's).
"""

from __future__ import annotations

from typing import Annotated, Any, Final, Literal

import msgspec
from msgspec import Meta, Struct

TICK_S = 0.05  # a room's events are sent in one frame per tick; sale updates at most one per tick

# --- close codes --------------------------------------------------------------
# uvicorn itself closes with 1009 (a frame over MAX_FRAME_BYTES) and 1012 (a graceful restart).
NORMAL = 1000            # the room ended
GOING_AWAY = 1001        # the server is shutting down: reconnect
POLICY = 1008            # abuse: too fast, or too much garbage
TRY_AGAIN_LATER = 1013   # reconnect: the client could not keep up, or a backend was away while it joined
SESSION_ENDED = 4401     # the session is invalid, expired or logged out
ROOM_NOT_FOUND = 4404

MAX_FRAME_BYTES = 4096
MAX_TEXT_CHARS = 200
# Like frames a user may send a second: per connection, and (likes_flush.lua) across all of them.
MAX_LIKE_FRAMES_PER_S = 20

# --- `error` event codes (besides the session's: invalid_token, session_expired, ...) ---------
BINARY_FRAME: Final = "binary_frame"
MALFORMED_JSON: Final = "malformed_json"
INVALID_MESSAGE: Final = "invalid_message"
LOGIN_REQUIRED: Final = "login_required"
INVALID_TEXT: Final = "invalid_text"
RATE_LIMITED: Final = "rate_limited"
BANNED_WORD: Final = "banned_word"
MUTED: Final = "muted"
UNAVAILABLE: Final = "unavailable"
TOO_MANY_CONNECTIONS: Final = "too_many_connections"
ROOM_NOT_FOUND_ERROR: Final = "room_not_found"
ERROR_CODES = (BINARY_FRAME, MALFORMED_JSON, INVALID_MESSAGE, LOGIN_REQUIRED, INVALID_TEXT, RATE_LIMITED, BANNED_WORD,
               MUTED, UNAVAILABLE, TOO_MANY_CONNECTIONS, ROOM_NOT_FOUND_ERROR)


# --- client -> server ---------------------------------------------------------
class _In(Struct, tag_field="type", forbid_unknown_fields=True):
    pass


class ChatIn(_In, tag="chat"):
    text: Annotated[str, Meta(max_length=2000)]


class LikeIn(_In, tag="like"):
    count: Annotated[int, Meta(ge=1, le=50)] = 1


class PingIn(_In, tag="ping"):
    pass


ClientMessage = ChatIn | LikeIn | PingIn
_decoder = msgspec.json.Decoder(ClientMessage)


def decode(frame: str | bytes) -> ClientMessage:
    """Raises msgspec.DecodeError (malformed) or msgspec.ValidationError (wrong shape)."""
    message: ClientMessage = _decoder.decode(frame)
    return message


# --- server -> client ---------------------------------------------------------
class _Out(Struct, tag_field="type", omit_defaults=False):
    pass


class UserRef(Struct):
    id: str
    name: str


class Chat(_Out, tag="chat"):
    id: str
    user: UserRef
    text: str
    ts: int  # epoch ms, UTC


class ChatDeleted(_Out, tag="chat_deleted"):
    id: str


class ChatRejected(_Out, tag="chat_rejected"):
    """Sent to the room's host only: a message that did not go out, and why."""
    user: UserRef
    text: str
    reason: Literal["banned_word", "muted"]
    ts: int


class Likes(_Out, tag="likes"):
    total: int
    delta: int


class Viewers(_Out, tag="viewers"):
    online: int
    peak: int


class Pin(_Out, tag="pin"):
    product: dict[str, Any]


class Unpin(_Out, tag="unpin"):
    pass


class Lineup(_Out, tag="lineup"):
    products: list[Any]


class RoomUpdate(_Out, tag="room"):
    room: dict[str, Any]


class RoomEnded(_Out, tag="room_ended"):
    ts: int


class Sale(_Out, tag="sale"):
    """A sale was launched, or started: its whole state (see SaleOut in the HTTP API)."""
    sale: Any


class SaleUpdate(_Out, tag="sale_update"):
    id: str
    remaining: int
    sold: int
    v: int  # apply only if higher than the last `v` seen for this sale


class SoldOut(_Out, tag="sold_out"):
    id: str
    v: int


class SaleEnded(_Out, tag="sale_ended"):
    id: str
    reason: str  # "host" | "time"
    v: int


class Pong(_Out, tag="pong"):
    ts: int


class Error(_Out, tag="error", omit_defaults=True):
    code: str
    message: str
    retry_after_ms: int | None = None


class Counts(Struct):
    online: int
    peak: int


class Welcome(_Out, tag="welcome"):
    room: dict[str, Any]
    you: dict[str, Any] | None
    pinned_product: Any  # product, or null
    sale: Any  # see SaleOut in the HTTP API, or null
    likes: int
    viewers: Counts
    history: list[Any]  # chat events, oldest first
    server_time: int  # epoch ms: clients anchor countdowns to this, not to their own clock


_encoder = msgspec.json.Encoder()


def encode(event: Any) -> bytes:
    return _encoder.encode(event)


def batch(events: list[bytes]) -> str:
    """Frame already-encoded events as one JSON array."""
    return (b"[" + b",".join(events) + b"]").decode()


def join_batches(frames: list[str]) -> str:
    """Several batch frames as one, their events in order."""
    inner = [f[1:-1] for f in frames if len(f) > 2]
    return "[" + ",".join(inner) + "]"


def error_frame(code: str, message: str, retry_after_ms: int | None = None) -> str:
    return batch([encode(Error(code=code, message=message, retry_after_ms=retry_after_ms))])


# --- between processes ----------------------------------------------------------
# A message on a room's channel: one byte saying who gets it, then its JSON.
EVERYONE = b"A"  # every viewer of the room
HOST = b"H"      # the room's host only
CONTROL = b"C"   # the hubs themselves: a control message, never forwarded


class _Control(Struct, tag_field="op", forbid_unknown_fields=True):
    pass


class MetaChanged(_Control, tag="meta"):
    """The room as viewers see it changed: hubs replace their cached copy."""
    room: dict[str, Any]


class BannedChanged(_Control, tag="banned"):
    """The room's banned words changed: hubs read them again."""


class CloseRoom(_Control, tag="close"):
    """Close every viewer's socket, after the events already queued."""
    code: int
    reason: str


Control = MetaChanged | BannedChanged | CloseRoom
_control_decoder = msgspec.json.Decoder(Control)


def to_everyone(event: Any) -> bytes:
    return EVERYONE + _encoder.encode(event)


def to_host(event: Any) -> bytes:
    return HOST + _encoder.encode(event)


def to_hubs(control: Control) -> bytes:
    return CONTROL + _encoder.encode(control)


def decode_control(payload: bytes) -> Control:
    """Raises msgspec.DecodeError or msgspec.ValidationError for a message no version sends."""
    control: Control = _control_decoder.decode(payload)
    return control
