"""The room WebSocket protocol, defined once (see docs/protocol.md).

Client -> server: one JSON object per text frame, with a `type`.
Server -> client: one JSON array of events per text frame (a tick's batch).
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from msgspec import Meta, Struct

# --- close codes --------------------------------------------------------------
NORMAL = 1000            # the room ended
GOING_AWAY = 1001        # the server is shutting down: reconnect
POLICY = 1008            # abuse: too fast, or too much garbage
TOO_BIG = 1009           # a frame over MAX_FRAME_BYTES
TRY_AGAIN_LATER = 1013   # reconnect: the client could not keep up, or a backend was away while it joined
SESSION_ENDED = 4401     # the session is invalid, expired or logged out
ROOM_NOT_FOUND = 4404

MAX_FRAME_BYTES = 4096
MAX_TEXT_CHARS = 200


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
    reason: str
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


Event = Chat | ChatDeleted | ChatRejected | Likes | Viewers | Pin | Unpin | Lineup | RoomUpdate | RoomEnded | Sale \
    | SaleUpdate | SoldOut | SaleEnded | Pong | Error | Welcome

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
