"""A room's shared state in Redis: presence, chat history, likes, pins, mutes,
banned words and counters. Every process reads and writes the same numbers."""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from typing import Any, Literal, cast

import msgspec

from server.backends.lua import NOW_MS, Prelude, load_script
from server.backends.redis_client import RedisClient, text
from server.ratelimit import GCRA, Limit
from server.rooms import keys, protocol
from server.rooms.publisher import Publisher

HISTORY_LEN = 50
PRESENCE_TTL_MS = 30_000  # a connection not refreshed for this long no longer counts
MAX_MUTES = 10_000  # per room at once: more than a raid's guest accounts, and a room's hash bounded
PRESENCE: Prelude = ("server.rooms", "presence.lua")  # count and peak, for both presence scripts

ChatStatus = Literal["posted", "rate_limited", "banned_word", "muted"]  # chat_post.lua's answers


@dataclass(frozen=True)
class Counts:
    online: int
    peak: int


@dataclass(frozen=True)
class Snapshot:
    pin: msgspec.Raw | None
    likes: int
    counts: Counts
    history: list[msgspec.Raw]  # oldest first


class RoomStore:
    def __init__(self, redis: RedisClient, publisher: Publisher) -> None:
        self.redis = redis
        self.publish = publisher.command  # scripts publish themselves, with the command they are given
        self._join = load_script(redis, "server.rooms", "presence_join.lua", NOW_MS, PRESENCE)
        self._count = load_script(redis, "server.rooms", "presence_count.lua", NOW_MS, PRESENCE)
        self._post = load_script(redis, "server.rooms", "chat_post.lua", NOW_MS, GCRA)
        self._delete = load_script(redis, "server.rooms", "chat_delete.lua")
        self._likes = load_script(redis, "server.rooms", "likes_flush.lua", NOW_MS, GCRA)
        self._refresh_pin = load_script(redis, "server.rooms", "pin_refresh.lua")
        self._mute = load_script(redis, "server.rooms", "mute.lua", NOW_MS)

    # --- presence -------------------------------------------------------------
    async def join(self, room_id: str, conn_id: str, viewer_id: str | None) -> Counts:
        online, peak = await self._join(
            keys=[keys.presence(room_id), keys.peak(room_id), keys.unique_viewers(room_id)],
            args=[conn_id, PRESENCE_TTL_MS, viewer_id or ""])
        return Counts(int(online), int(peak))

    async def leave(self, room_id: str, conn_id: str) -> Counts:
        online, peak = await self._count(keys=[keys.presence(room_id), keys.peak(room_id)], args=[conn_id])
        return Counts(int(online), int(peak))

    async def counts(self, room_id: str) -> Counts:
        online, peak = await self._count(keys=[keys.presence(room_id), keys.peak(room_id)], args=[""])
        return Counts(int(online), int(peak))

    async def refresh(self, room_conns: dict[str, list[str]]) -> None:
        """Push back the expiry of this process's live connections; add back any that expired
        meanwhile (Redis away for longer than PRESENCE_TTL_MS, or restarted without them)."""
        if not room_conns:
            return
        expiry = int(time.time() * 1000) + PRESENCE_TTL_MS
        async with self.redis.pipeline(transaction=False) as pipe:
            for room_id, conn_ids in room_conns.items():
                if conn_ids:
                    pipe.zadd(keys.presence(room_id), {c: expiry for c in conn_ids})
            await pipe.execute()

    async def forget(self, room_conns: dict[str, list[str]]) -> None:
        """Remove connections from presence (they left while a refresh was adding them back)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for room_id, conn_ids in room_conns.items():
                if conn_ids:
                    pipe.zrem(keys.presence(room_id), *conn_ids)
            await pipe.execute()

    # --- chat -------------------------------------------------------------------
    async def post_chat(self, room_id: str, message_id: str, user_id: str, event: bytes, *, rejected: bytes,
                        banned: bool, limit: Limit) -> tuple[ChatStatus, int]:
        """Spend from the sender's `limit`, then record and publish, once per message id; or refuse
        (a banned word, a mute: the host gets `rejected`). The status, and the ms to wait
        (rate_limited) or the mute's end (muted)."""
        status, n = await self._post(
            keys=[keys.mutes(room_id), keys.history(room_id), keys.chat_count(room_id), keys.channel(room_id),
                  keys.done(room_id, message_id), keys.chat_limit(room_id, user_id)],
            args=[user_id, event, rejected, int(banned), self.publish, HISTORY_LEN, limit.interval_ms, limit.burst])
        return cast(ChatStatus, text(status)), int(n)

    async def delete_chat(self, room_id: str, message_id: str, event: bytes) -> bool:
        prefix = b'{"type":"chat","id":' + msgspec.json.encode(message_id)
        found = await self._delete(keys=[keys.history(room_id), keys.channel(room_id)],
                                   args=[prefix, event, self.publish])
        return bool(found)

    # --- likes ------------------------------------------------------------------
    async def flush_likes(self, room_id: str, per_user: dict[str, list[int]]) -> tuple[int, int]:
        users = list(per_user)
        flat: list[int] = []
        for u in users:
            flat += per_user[u]
        total, accepted = await self._likes(
            keys=[keys.likes(room_id), keys.channel(room_id), keys.done(room_id, "likes:" + secrets.token_hex(8))]
            + [keys.like_bucket(room_id, u) for u in users],
            args=[self.publish, 1000 / protocol.MAX_LIKE_FRAMES_PER_S, protocol.MAX_LIKE_FRAMES_PER_S, *flat])
        return int(total), int(accepted)

    # --- moderation -------------------------------------------------------------
    async def mute(self, room_id: str, user_id: str, duration_ms: int) -> int | None:
        """Mute for `duration_ms` (Redis's clock); the ms timestamp it lasts until, or None if the
        room holds MAX_MUTES mutes already."""
        until_ms = int(await self._mute(keys=[keys.mutes(room_id)], args=[user_id, duration_ms, MAX_MUTES]))
        return until_ms or None

    async def unmute(self, room_id: str, user_id: str) -> bool:
        return bool(await self.redis.hdel(keys.mutes(room_id), user_id))

    async def mutes(self, room_id: str) -> dict[str, int]:
        now = int(time.time() * 1000)
        raw = await self.redis.hgetall(keys.mutes(room_id))
        return {text(k): int(v) for k, v in raw.items() if int(v) > now}

    async def set_banned_words(self, room_id: str, words: list[str]) -> None:
        key = keys.banned_words(room_id)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(key)
            if words:
                pipe.sadd(key, *words)
            await pipe.execute()

    async def banned_words(self, room_id: str) -> list[str]:
        return sorted(text(w) for w in await self.redis.smembers(keys.banned_words(room_id)))

    # --- pin, welcome, stats ------------------------------------------------------
    async def set_pin(self, room_id: str, product: dict[str, Any] | None) -> None:
        if product is None:
            await self.redis.hdel(keys.state(room_id), "pin")
        else:
            await self.redis.hset(keys.state(room_id), "pin", msgspec.json.encode(product))

    async def refresh_pin(self, room_id: str, product: dict[str, Any], message: bytes) -> bool:
        """Replace the pinned copy of `product` and publish `message`, if it is still pinned."""
        return bool(await self._refresh_pin(keys=[keys.state(room_id), keys.channel(room_id)],
                                            args=[product["id"], msgspec.json.encode(product), message,
                                                  self.publish]))

    async def snapshot(self, room_id: str) -> Snapshot:
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hget(keys.state(room_id), "pin")
            pipe.get(keys.likes(room_id))
            pipe.lrange(keys.history(room_id), 0, HISTORY_LEN - 1)
            pin, likes, history = await pipe.execute()
        counts = await self.counts(room_id)
        # Raw: stored JSON goes back on the wire without a decode/encode round trip.
        return Snapshot(pin=msgspec.Raw(pin) if pin else None, likes=int(likes or 0), counts=counts, history=[msgspec.Raw(h) for h in reversed(history)])

    async def stats(self, room_id: str) -> dict[str, int]:
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.get(keys.likes(room_id))
            pipe.get(keys.chat_count(room_id))
            # As a plain command: redis-py's cluster pipeline refuses PFCOUNT (it may take many keys).
            pipe.execute_command("PFCOUNT", keys.unique_viewers(room_id))
            likes, chats, unique = await pipe.execute()
        counts = await self.counts(room_id)
        return {"viewers": counts.online, "peak_viewers": counts.peak, "likes": int(likes or 0),
                "chat_messages": int(chats or 0), "unique_viewers": int(unique or 0)}
