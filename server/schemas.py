"""HTTP wire types for accounts, products and rooms (msgspec structs).

Inputs forbid unknown fields; validation errors name the field. The same
types generate the OpenAPI schema.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import UNSET, Meta, Struct, UnsetType

from server.text import clean, visible

Username = Annotated[str, Meta(min_length=3, max_length=32, pattern=r"^[A-Za-z0-9_.-]+\Z",
                               description="3-32 letters, digits, '_', '.' or '-'")]
Password = Annotated[str, Meta(min_length=8, max_length=128)]
# The schema says what the server's cleaning (server/text.py) checks as far as a regex can: at least
# one character of scripts that always print (ASCII, Latin, Greek, Cyrillic, kana, CJK, Hangul).
# The server takes more (an emoji alone, other scripts): the schema is the narrower promise.
VISIBLE = ("[!-~\u00a1-\u00ac\u00ae-\u02ff\u0370-\u0377\u037a-\u037f\u0384-\u03ff\u0400-\u0482"
           "\u048a-\u052f\u3041-\u3096\u30a1-\u30fa\u4e00-\u9fff\uac00-\ud7a3]")
_NAMED = {"pattern": VISIBLE, "description": "shown trimmed, without control characters; not blank"}
DisplayName = Annotated[str, Meta(min_length=1, max_length=32, extra_json_schema=_NAMED)]
Title = Annotated[str, Meta(min_length=1, max_length=120, extra_json_schema=_NAMED)]
# Text kept as sent (line breaks and all) but never a NUL, which PostgreSQL cannot store.
Description = Annotated[str, Meta(max_length=2000, pattern=r"^[^\x00]*\Z")]
PriceCents = Annotated[int, Meta(ge=1, le=100_000_000, description="integer cents")]
BasisPoints = Annotated[int, Meta(ge=0, le=10_000, description="basis points: 2000 = 20%")]
# A character of a URL: no control character and no space of any kind. Spelled out, not `\s`,
# which means other characters in Python's regexes than in JSON Schema's (ECMA 262).
_SPACES = r"\x00-\x20\x7f-\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000\ufeff"
_URL_CHAR = rf"[^{_SPACES}]"
# http(s) URLs only, so a `javascript:` URL can never reach an href or src.
WebUrl = Annotated[str, Meta(max_length=2048, pattern=rf"^https?://{_URL_CHAR}+\Z")]
# Images may also be served by this app (a path starting with one slash, and no backslash after it:
# browsers read `/\host` as another host).
ImageUrl = Annotated[str, Meta(max_length=2048,
                                pattern=rf"^(https?://{_URL_CHAR}+|/[^/\\{_SPACES}]{_URL_CHAR}*)\Z")]
Timestamp = Annotated[str, Meta(description="ISO 8601, UTC")]


def _required_text(value: str, name: str) -> str:
    cleaned = clean(value)
    if not visible(cleaned):
        raise ValueError(f"field `{name}` must not be blank")
    return cleaned


class Input(Struct, forbid_unknown_fields=True, kw_only=True):
    def apply_to(self, row: object) -> None:
        """Copy the fields that were sent (a PATCH) onto a model row."""
        for name, value in msgspec.structs.asdict(self).items():
            if value is not UNSET:
                setattr(row, name, value)


# --- accounts ---------------------------------------------------------------

class RegisterIn(Input):
    username: Username
    password: Password
    role: Literal["host", "viewer"]


class LoginIn(Input):
    username: Annotated[str, Meta(min_length=1, max_length=64, pattern=r"^[^\x00]*\Z")]
    password: Annotated[str, Meta(min_length=1, max_length=128)]


class GuestIn(Input):
    name: DisplayName

    def __post_init__(self) -> None:
        self.name = _required_text(self.name, "name")


class UserOut(Struct, kw_only=True):
    user_id: str
    username: str
    name: str
    role: Literal["host", "viewer"]
    guest: bool
    created_at: Timestamp


class AuthOut(UserOut, kw_only=True):
    token: str
    expires_at: Timestamp


# --- products ---------------------------------------------------------------

class ProductIn(Input):
    name: Title
    price_cents: PriceCents
    commission_rate_bp: BasisPoints
    description: Description = ""
    image_url: ImageUrl | None = None

    def __post_init__(self) -> None:
        self.name = _required_text(self.name, "name")


class ProductPatch(Input):
    name: Title | UnsetType = UNSET
    price_cents: PriceCents | UnsetType = UNSET
    commission_rate_bp: BasisPoints | UnsetType = UNSET
    description: Description | UnsetType = UNSET
    image_url: ImageUrl | None | UnsetType = UNSET

    def __post_init__(self) -> None:
        if self.name is not UNSET:
            self.name = _required_text(self.name, "name")


class ProductOut(Struct, kw_only=True):
    id: str
    host_id: str
    name: str
    description: str
    image_url: str | None
    price_cents: int
    commission_rate_bp: int
    created_at: Timestamp
    updated_at: Timestamp


# --- rooms ------------------------------------------------------------------

class RoomIn(Input):
    title: Title
    stream_url: WebUrl | None = None

    def __post_init__(self) -> None:
        self.title = _required_text(self.title, "title")


class RoomPatch(Input):
    title: Title | UnsetType = UNSET
    stream_url: WebUrl | None | UnsetType = UNSET

    def __post_init__(self) -> None:
        if self.title is not UNSET:
            self.title = _required_text(self.title, "title")


class HostOut(Struct, kw_only=True):
    id: str
    name: str


class RoomOut(Struct, kw_only=True):
    id: str
    title: str
    stream_url: str | None
    status: Literal["scheduled", "live", "ended"]
    host: HostOut
    pinned_product: ProductOut | None
    url: str
    created_at: Timestamp
    started_at: Timestamp | None
    ended_at: Timestamp | None


class Health(Struct, kw_only=True):
    status: Literal["ok", "unavailable"]
    redis: str
    database: str
    pubsub: Literal["ok", "down"]
    jobs: Literal["ok", "down"]  # a jobs process beat lately (server/heartbeat.py)


class ErrorOut(Struct, kw_only=True):
    error: str
    message: str
    field: str | msgspec.UnsetType = UNSET


# --- live room: pins, moderation, stats -------------------------------------

class PinIn(Input):
    product_id: Annotated[str, Meta(max_length=64)]


class LineupIn(Input):
    product_ids: Annotated[list[Annotated[str, Meta(max_length=64)]], Meta(max_length=50)]


class MuteIn(Input):
    user_id: Annotated[str, Meta(max_length=64)]
    duration_s: Annotated[int, Meta(ge=1, le=7 * 24 * 3600)] = 600


class MuteOut(Struct, kw_only=True):
    user_id: str
    name: str | None  # the user's display name; None for an id no account has
    until: Timestamp


BannedWord = Annotated[str, Meta(min_length=1, max_length=50)]


class BannedWordsIn(Input):
    words: Annotated[list[BannedWord], Meta(max_length=200)]


class BannedWordsOut(Struct, kw_only=True):
    words: list[str]


class DeletedOut(Struct, kw_only=True):
    id: str
    in_history: bool


class RoomStatsOut(Struct, kw_only=True):
    viewers: int
    peak_viewers: int
    likes: int
    chat_messages: int
    unique_viewers: int
    orders: int
    paid_orders: int
    units_sold: int  # paid units
    gmv_cents: int  # paid orders' value
    commission_cents: int  # the host's share of it
    buyers: int
    conversion: float  # buyers / unique viewers
