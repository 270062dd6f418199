"""server.auth.Sessions: revoked sessions kept in memory while the sessions channel is in sync,
Redis asked otherwise; signature checks cached per token, with expiry re-checked and bad tokens
never cached. In-process against the session Valkey (a database index of its own); the same
flow through a running server is tests/api/test_sessions.py's."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Collection

import pytest
from itsdangerous import URLSafeTimedSerializer
from redis.asyncio import Redis

from server.auth import REVOKED_KEY, Principal, Sessions
from server.errors import Unauthorized
from tests.support import DB_REVOCATION, SALT, eventually, open_redis, redis_db_url

SECRET = "revocation-secret-" + "r" * 32
TTL_S = 3600


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[Redis]:
    async with open_redis(redis_db_url(redis_url, DB_REVOCATION), 8) as client:
        await client.delete(REVOKED_KEY)
        yield client
        await client.delete(REVOKED_KEY)


def process(redis: Redis, ttl_s: int = TTL_S) -> Sessions:
    """One app process's Sessions (every process of a deployment shares the secret and the Redis)."""
    return Sessions(SECRET, ttl_s, redis)


async def login(sessions: Sessions, name: str = "vera") -> tuple[str, Principal]:
    token = sessions.issue(f"usr_{name}", "viewer", name)
    return token, await sessions.verify(token)


async def refused(sessions: Sessions, token: str) -> str:
    """verify() must refuse: the error code it gives."""
    with pytest.raises(Unauthorized) as caught:
        await sessions.verify(token)
    return caught.value.code


async def test_before_sync_a_revocation_by_another_process_is_seen_in_redis(redis: Redis) -> None:
    mine, other = process(redis), process(redis)
    token, principal = await login(mine)
    assert not mine.in_sync
    await other.revoke(principal)  # another process logs the session out
    assert await redis.zscore(REVOKED_KEY, principal.session_id) is not None
    assert await refused(mine, token) == "session_revoked"  # nothing told `mine`: it asked Redis
    # A session nobody revoked is still let in.
    other_token, _ = await login(mine, "olga")
    assert (await mine.verify(other_token)).user_id == "usr_olga"


async def test_after_sync_earlier_revocations_are_refused_from_memory(redis: Redis) -> None:
    mine, other = process(redis), process(redis)
    token, principal = await login(mine)
    kept_token, kept = await login(mine, "kim")
    await other.revoke(principal)  # before `mine` follows the channel
    await mine.sync()
    assert mine.in_sync
    assert await refused(mine, token) == "session_revoked"
    assert (await mine.verify(kept_token)).session_id == kept.session_id

    # From memory, not Redis: with the Redis record gone, the session is still refused.
    await redis.delete(REVOKED_KEY)
    assert await refused(mine, token) == "session_revoked"

    # A revocation announced on the channel (revoked()), with no Redis write, is refused at once.
    assert await redis.zscore(REVOKED_KEY, kept.session_id) is None
    mine.revoked(kept.session_id)
    assert mine.in_sync
    assert await refused(mine, kept_token) == "session_revoked"
    assert await redis.exists(REVOKED_KEY) == 0  # nothing was written


async def test_a_process_own_logout_is_refused_in_and_out_of_sync(redis: Redis) -> None:
    mine = process(redis)
    token, principal = await login(mine)
    await mine.revoke(principal)
    assert await refused(mine, token) == "session_revoked"  # out of sync: from Redis
    await mine.sync()
    assert await refused(mine, token) == "session_revoked"  # in sync: from memory


async def test_lost_makes_it_ask_redis_again_until_the_next_sync(redis: Redis) -> None:
    mine, other = process(redis), process(redis)
    token, principal = await login(mine)
    await mine.sync()
    # A revocation whose channel message this process missed (its link was down).
    await other.revoke(principal)
    mine.lost()
    assert not mine.in_sync
    assert await refused(mine, token) == "session_revoked"  # asked Redis

    # The link is back: the missed revocation is loaded, and reported (the broker closes its sockets).
    assert await mine.sync() == {principal.session_id}
    assert mine.in_sync
    assert await mine.sync() == set()  # known now: not reported again
    await redis.delete(REVOKED_KEY)
    assert await refused(mine, token) == "session_revoked"  # and kept in memory


async def test_sync_skips_revocations_whose_tokens_have_expired_anyway(redis: Redis) -> None:
    mine = process(redis)
    now = time.time()
    await redis.zadd(REVOKED_KEY, {"expired-session": now - 10, "live-session": now + 600})
    await mine.sync()
    serializer = URLSafeTimedSerializer(SECRET, salt=SALT)
    live = str(serializer.dumps({"u": "usr_live", "s": "live-session", "r": "viewer", "n": "live"}))
    assert await refused(mine, live) == "session_revoked"


async def test_an_expired_token_is_refused_even_when_its_decoded_form_is_cached(redis: Redis) -> None:
    out_of_sync, in_sync = process(redis, ttl_s=1), process(redis, ttl_s=1)
    await in_sync.sync()
    # Tokens carry their signing time in whole seconds: issued just past a second's start, one
    # with a 1 s lifetime expires about a second later, which leaves time to verify it first.
    await asyncio.sleep(1.0 - time.time() % 1.0 + 0.01)
    logins = [(sessions, *await login(sessions)) for sessions in (out_of_sync, in_sync)]
    for sessions, token, principal in logins:
        hits = sessions._decoded.cache_info().hits
        assert (await sessions.verify(token)).session_id == principal.session_id
        assert sessions._decoded.cache_info().hits == hits + 1  # the signature check was not redone

    wait = max(p.expires_at for _, _, p in logins) - time.time() + 0.05
    assert 0 < wait <= 1.1, wait
    await asyncio.sleep(wait)
    for sessions, token, _ in logins:
        hits = sessions._decoded.cache_info().hits
        assert await refused(sessions, token) == "session_expired"
        assert sessions._decoded.cache_info().hits == hits + 1  # refused from the cached form
        assert await refused(sessions, token) == "session_expired"


async def test_a_tampered_token_is_refused_every_time_and_never_cached(redis: Redis) -> None:
    mine = process(redis)
    await mine.sync()
    token, principal = await login(mine)
    body, _, signature = token.rpartition(".")
    # The first character: the last one of an unpadded base64 text also holds padding bits,
    # and changing only those leaves the same bytes (the same, valid, signature).
    flipped = ("B" if signature[0] != "B" else "C") + signature[1:]
    payload, _, stamp = body.rpartition(".")
    other_key = str(URLSafeTimedSerializer("another-secret-" + "x" * 32, salt=SALT).dumps(
        {"u": principal.user_id, "s": principal.session_id, "r": "host", "n": principal.name}))
    forged = [
        f"{body}.{flipped}",                         # signature changed
        f"{'f' if payload[0] != 'f' else 'g'}{payload[1:]}.{stamp}.{signature}",  # payload changed
        other_key,                                   # signed with another secret
        token + "x",                                 # trailing garbage
        "not-a-token",
    ]
    size = mine._decoded.cache_info().currsize
    for attempt in range(3):
        for bad in forged:
            assert await refused(mine, bad) == "invalid_token", (attempt, bad)
    assert mine._decoded.cache_info().currsize == size  # none of them was cached
    # The genuine token, cached before, is unaffected.
    assert (await mine.verify(token)).session_id == principal.session_id


class NoRooms:
    """A broker listener with no rooms to serve: here only the sessions channel matters."""

    def on_message(self, room_id: str, data: bytes) -> None:
        pass

    async def resync(self) -> None:
        pass

    def end_sessions(self, session_ids: Collection[str]) -> None:
        pass


async def test_a_logout_whose_message_was_lost_is_seen_at_the_next_resync(
        redis: Redis, redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The broker reloads the revoked sessions every SESSIONS_RESYNC_S while subscribed: a logout
    recorded in Redis whose pub/sub message never came (its publish failed) is refused after that."""
    from server.backends.redis_nodes import Nodes
    from server.rooms import broker as broker_module
    from server.rooms import node_link
    from server.rooms.publisher import Publisher

    monkeypatch.setattr(node_link, "SESSIONS_RESYNC_S", 0.3)
    mine, other = process(redis), process(redis)
    broker = broker_module.Broker(Nodes(redis), mine, sharded=(await Publisher.detect(redis)).sharded)
    task = asyncio.create_task(broker.run(NoRooms()))
    try:
        async def synced() -> bool:
            return mine.in_sync

        await eventually(synced, timeout=10, what="the broker loading the revoked sessions")
        token, principal = await login(mine)
        await other.revoke(principal)  # in Redis, but no message is published

        async def refused_now() -> bool:
            try:
                await mine.verify(token)
            except Unauthorized as exc:
                return exc.code == "session_revoked"
            return False

        await eventually(refused_now, timeout=10, what="the lost logout being seen")
        assert mine.in_sync  # from memory, not by asking Redis
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
