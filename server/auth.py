"""Passwords, signed session tokens, and who is calling.

A token is an itsdangerous-signed payload {user id, session id, role, name}
with its signing time; it expires after LIVESALE_TOKEN_TTL_S. Carrying the
role and name in the token keeps the hot paths (purchase, chat) free of a
database read; logging out revokes the session id in Redis.

Checking revocation must not cost a Redis round trip per request either. Each
process keeps the set of revoked sessions in memory: loaded once its pub/sub
link has subscribed to the sessions channel, then kept current by the
channel's messages (a logout adds to the Redis set first, then publishes).
Whenever that link is down, or before it is up, requests ask Redis instead.
"""

from __future__ import annotations

import asyncio
import functools
import secrets
import time
from dataclasses import dataclass, replace
from typing import Literal, Mapping, cast

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from itsdangerous import BadSignature, SignatureExpired, URLSafeTimedSerializer

from server.backends.redis_client import RedisClient
from server.errors import Forbidden, Unauthorized
from server.origins import origin_allowed, own_origin

COOKIE_NAME = "livesale_session"
DROP_COOKIE = f"{COOKIE_NAME}=; Max-Age=0; Path=/; HttpOnly; SameSite=Lax"  # expires it at once
Role = Literal["host", "viewer"]

_hasher = PasswordHasher()
# Verified against when the username is unknown, so both paths cost one hash.
_DUMMY_HASH = _hasher.hash(secrets.token_urlsafe(16))


async def hash_password(password: str) -> str:
    return await asyncio.to_thread(_hasher.hash, password)


async def verify_password(password_hash: str | None, password: str) -> bool:
    def check() -> bool:
        try:
            return _hasher.verify(password_hash or _DUMMY_HASH, password) and password_hash is not None
        except (VerificationError, InvalidHashError):
            return False

    return await asyncio.to_thread(check)


@dataclass(frozen=True)
class Principal:
    user_id: str
    role: Role
    name: str
    session_id: str
    expires_at: float  # epoch seconds
    via_cookie: bool = False

    @property
    def is_host(self) -> bool:
        return self.role == "host"


# Sorted set: revoked session id -> when its token expires anyway (epoch s), after which it is dropped.
REVOKED_KEY = "sessions:revoked"
DECODED_CACHE = 16_384  # tokens whose signature was checked, per process


class Sessions:
    def __init__(self, secret_key: str, ttl_s: int, redis: RedisClient) -> None:
        self._serializer = URLSafeTimedSerializer(secret_key, salt="livesale.session.v1")
        self.ttl_s = ttl_s
        self._redis = redis
        # Checking a signature costs more than the rest of a purchase's Python; a token's
        # contents never change, so the check is done once per token (expiry is re-checked).
        self._decoded = functools.lru_cache(maxsize=DECODED_CACHE)(self._decode)
        self._revoked: dict[str, float] = {}  # session id -> expiry; complete while in_sync
        self._prune_at = 1024
        self.in_sync = False

    def issue(self, user_id: str, role: Role, name: str) -> str:
        payload = {"u": user_id, "s": secrets.token_urlsafe(12), "r": role, "n": name}
        return str(self._serializer.dumps(payload))

    def _decode(self, token: str) -> Principal:
        try:
            payload, signed_at = self._serializer.loads(token, max_age=self.ttl_s, return_timestamp=True)
        except SignatureExpired:
            raise Unauthorized("session expired, log in again", code="session_expired") from None
        except BadSignature:
            raise Unauthorized("invalid session token", code="invalid_token") from None
        if not isinstance(payload, dict) or payload.get("r") not in ("host", "viewer") \
                or not all(isinstance(payload.get(k), str) for k in ("u", "s", "n")):
            raise Unauthorized("invalid session token", code="invalid_token")
        return Principal(user_id=str(payload["u"]), role=payload["r"], name=str(payload["n"]),
                         session_id=str(payload["s"]), expires_at=signed_at.timestamp() + self.ttl_s)

    async def verify(self, token: str) -> Principal:
        principal = self._decoded(token)
        if time.time() > principal.expires_at:
            raise Unauthorized("session expired, log in again", code="session_expired")
        if await self.is_revoked(principal.session_id):
            raise Unauthorized("session has been logged out", code="session_revoked")
        return principal

    async def is_revoked(self, session_id: str) -> bool:
        if self.in_sync:
            return session_id in self._revoked
        return await self._redis.zscore(REVOKED_KEY, session_id) is not None

    async def revoke(self, principal: Principal) -> None:
        """Revoke in Redis; the caller then publishes the session id to the other processes."""
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.zadd(REVOKED_KEY, {principal.session_id: principal.expires_at})
            pipe.zremrangebyscore(REVOKED_KEY, "-inf", time.time())
            await pipe.execute()
        self._revoked[principal.session_id] = principal.expires_at

    # --- the in-memory copy, fed by the broker's sessions channel ---------------------------
    async def sync(self) -> set[str]:
        """The sessions channel is subscribed: load every revocation made before, and trust
        the copy from now on (later ones arrive as messages). Returns the sessions the copy
        did not have: logouts whose message was missed."""
        now = time.time()
        rows = cast(list[tuple[bytes, float]],
                    await self._redis.zrangebyscore(REVOKED_KEY, now, "+inf", withscores=True))
        self._prune(now)
        loaded = {sid.decode(): float(exp) for sid, exp in rows}
        missed = loaded.keys() - self._revoked.keys()
        self._revoked.update(loaded)
        self.in_sync = True
        return missed

    def lost(self) -> None:
        """The channel's link is down: messages may be missed, so ask Redis until the next sync."""
        self.in_sync = False

    def revoked(self, session_id: str) -> None:
        """A revocation announced on the channel (its expiry is at most one token lifetime away)."""
        now = time.time()
        self._revoked.setdefault(session_id, now + self.ttl_s)
        if len(self._revoked) >= self._prune_at:
            self._prune(now)

    def _prune(self, now: float) -> None:
        self._revoked = {sid: exp for sid, exp in self._revoked.items() if exp > now}
        self._prune_at = max(1024, 2 * len(self._revoked))


def token_from(headers: Mapping[str, str], cookies: Mapping[str, str]) -> tuple[str | None, bool]:
    """The bearer token if any, else the session cookie; and whether it came from the cookie."""
    auth = headers.get("authorization")
    if auth:
        scheme, _, value = auth.partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            raise Unauthorized("Authorization header must be 'Bearer <token>'", code="invalid_token")
        return value.strip(), False
    cookie = cookies.get(COOKIE_NAME)
    return (cookie, True) if cookie else (None, False)


async def authenticate(sessions: Sessions, headers: Mapping[str, str], cookies: Mapping[str, str]
                       ) -> Principal | None:
    token, via_cookie = token_from(headers, cookies)
    if token is None:
        return None
    try:
        principal = await sessions.verify(token)
    except Unauthorized as exc:
        if via_cookie:  # a dead cookie goes with the 401: the browser goes on as anonymous (anyone may watch)
            exc.headers = {**exc.headers, "Set-Cookie": DROP_COOKIE}
        raise
    if via_cookie:
        principal = replace(principal, via_cookie=True)
    return principal


def check_csrf(principal: Principal | None, method: str, headers: Mapping[str, str], scheme: str,
               allowed: tuple[str, ...]) -> None:
    """A cookie rides along on cross-site requests; a bearer token does not.

    So a state-changing request authenticated by cookie must come from an
    allowed origin (browsers always send Origin on such requests).
    """
    if principal is None or not principal.via_cookie or method in ("GET", "HEAD", "OPTIONS"):
        return
    origin = headers.get("origin")
    if origin is None:
        referer = headers.get("referer", "")
        parts = referer.split("/")
        origin = "/".join(parts[:3]) if len(parts) >= 3 and parts[0] in ("http:", "https:") else None
    if origin is None or not origin_allowed(origin, own_origin(scheme, headers), allowed):
        raise Forbidden("cross-site request refused: send the token as a Bearer header or call from the app's origin",
                        code="csrf")
