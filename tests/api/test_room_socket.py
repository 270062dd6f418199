"""What the room socket does with bad, abusive or unauthenticated input, and the
handshake checks (Origin, session, room), against the shared real server."""

from __future__ import annotations

import json
import time
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any, AsyncIterator

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from server.ids import new_id
from tests.rooms.support import Viewer, chat_text, chats_in, errors_in, of_type, open_viewer, sync_point, ws_url
from tests.support import Actor, ServerProcess, api_client, craft_token, create_room, eventually, guest, register


@pytest.fixture(scope="module")
async def api(server: ServerProcess) -> AsyncIterator[httpx.AsyncClient]:
    async with api_client(server.url) as c:
        yield c


@pytest.fixture(scope="module")
async def host(api: httpx.AsyncClient) -> Actor:
    return await register(api, "host")


@pytest.fixture
async def room(api: httpx.AsyncClient, host: Actor) -> dict[str, Any]:
    return await create_room(api, host, title="Input checks")


@pytest.fixture
async def user(api: httpx.AsyncClient) -> Actor:
    return await guest(api, "Tester")


async def still_open(v: Viewer) -> None:
    events = await v.ping()
    pong = events[-1]
    assert set(pong) == {"type", "ts"} and isinstance(pong["ts"], int)


# --- 9. bad input ---------------------------------------------------------------------------------------

BAD_FRAMES: list[tuple[str | bytes, str, str]] = [
    # frame, error code, a word the message must contain
    ("not json", "malformed_json", ""),
    ("{", "malformed_json", ""),
    ("", "malformed_json", ""),
    ('{"type": "ping"} trailing', "malformed_json", ""),
    ('{"type": "dance"}', "invalid_message", "type"),
    ('{"text": "no type"}', "invalid_message", "type"),
    ('{"type": "chat", "text": "hi", "color": "red"}', "invalid_message", "color"),
    ('{"type": "ping", "extra": 1}', "invalid_message", "extra"),
    ('{"type": "like", "count": "5"}', "invalid_message", "count"),
    ('{"type": "like", "count": 0}', "invalid_message", "count"),
    ('{"type": "like", "count": 51}', "invalid_message", "count"),
    ('{"type": "like", "count": -1}', "invalid_message", "count"),
    ('{"type": "like", "count": 2.5}', "invalid_message", "count"),
    ('{"type": "like", "count": null}', "invalid_message", "count"),
    ('{"type": "chat", "text": 5}', "invalid_message", "text"),
    ('{"type": "chat", "text": null}', "invalid_message", "text"),
    ('{"type": "chat"}', "invalid_message", "text"),
    ('{"type": "chat", "text": "' + "x" * 2001 + '"}', "invalid_message", "text"),
    ('[{"type": "ping"}]', "invalid_message", "object"),
    ('"ping"', "invalid_message", "object"),
    (b'{"type": "ping"}', "binary_frame", ""),
    (b"\x00\xff", "binary_frame", ""),
]


@pytest.mark.parametrize(("frame", "code", "word"), BAD_FRAMES, ids=[repr(f)[:40] for f, _, _ in BAD_FRAMES])
async def test_bad_frame_gets_an_error_and_the_connection_stays_open(server: ServerProcess, room: dict[str, Any],
                                                                      user: Actor, frame: str | bytes,
                                                                      code: str, word: str) -> None:
    async with open_viewer(server.url, room["id"], user.token) as v:
        await v.send(frame)
        error = await v.expect_error(code)
        assert set(error) == {"type", "code", "message"}, error
        assert word in error["message"], error
        await still_open(v)
        # and it still works normally
        await v.like(2)
        await v.expect(lambda e: e["type"] == "likes" and e["delta"] >= 2, what="likes")


async def test_frame_size_limit(server: ServerProcess, room: dict[str, Any], user: Actor) -> None:
    async with open_viewer(server.url, room["id"], user.token) as v:
        ping = '{"type": "ping"}'
        await v.send(ping + " " * (4096 - len(ping)))  # exactly 4 KiB: fine
        await v.expect_type("pong")
        await v.send(json.dumps({"type": "chat", "text": "x" * 4100}))
        events, close = await v.expect_close()
        assert errors_in(events) == []
        assert close is not None and close.code == 1009, close


async def test_frame_size_limit_counts_bytes(server: ServerProcess, room: dict[str, Any], user: Actor) -> None:
    async with open_viewer(server.url, room["id"], user.token) as v:
        await v.send(json.dumps({"type": "chat", "text": "漢" * 1400}, ensure_ascii=False))  # 1400 chars, 4200+ bytes
        _, close = await v.expect_close()
        assert close is not None and close.code == 1009, close


async def test_a_garbage_flood_is_closed_with_1008(server: ServerProcess, room: dict[str, Any],
                                                   user: Actor) -> None:
    async with open_viewer(server.url, room["id"], user.token) as v:
        for i in range(40):
            await v.send(f"garbage {i}")
        events, close = await v.expect_close()
        errors = errors_in(events)
        assert close is not None and close.code == 1008, close
        # about 20 answered, then the close; never all 40
        assert 10 <= len(errors) < 40, len(errors)
        assert {e["code"] for e in errors} == {"malformed_json"}


async def test_a_few_bad_frames_spread_out_are_tolerated(server: ServerProcess, room: dict[str, Any],
                                                         user: Actor) -> None:
    async with open_viewer(server.url, room["id"], user.token) as v:
        for _ in range(15):  # under the burst of 20
            await v.send("oops")
            await v.expect_error("malformed_json")
        await still_open(v)


async def test_likes_faster_than_20_a_second_are_closed_with_1008(server: ServerProcess, room: dict[str, Any],
                                                                   user: Actor) -> None:
    async with open_viewer(server.url, room["id"], user.token) as v:
        for _ in range(40):
            await v.like()
        events, close = await v.expect_close()
        assert close is not None and close.code == 1008, close
        assert errors_in(events) == []


async def test_pings_are_answered_up_to_30_at_once_and_a_flood_is_closed_with_1008(
        server: ServerProcess, room: dict[str, Any]) -> None:
    async with open_viewer(server.url, room["id"]) as v:
        for _ in range(20):  # a clock sync's worth, and more
            await v.send({"type": "ping"})
        for _ in range(20):
            await v.expect(lambda e: e["type"] == "pong", what="a pong")
        for _ in range(40):
            await v.send({"type": "ping"})
        events, close = await v.expect_close()
        assert close is not None and close.code == 1008 and close.reason == "pings too fast", close
        assert errors_in(events) == []


async def test_anonymous_viewers_cannot_chat_or_like(server: ServerProcess, room: dict[str, Any],
                                                    user: Actor) -> None:
    async with open_viewer(server.url, room["id"]) as anon, \
            open_viewer(server.url, room["id"], user.token, label="watcher") as watcher:
        await anon.chat("hello?")
        await anon.expect_error("login_required")
        await anon.like(3)
        await anon.expect_error("login_required")
        await anon.send({"type": "like"})
        await anon.expect_error("login_required")
        await still_open(anon)
        events = (await sync_point(watcher, [watcher]))[0]
        assert [e for e in events if e["type"] in ("likes", "error")] == []
        assert "hello?" not in chats_in(events)
    async with open_viewer(server.url, room["id"]) as late:
        assert late.welcome is not None
        assert "hello?" not in [e["text"] for e in late.welcome["history"]]


async def test_anonymous_like_flood_is_closed_with_1008(server: ServerProcess, room: dict[str, Any]) -> None:
    # Found by this suite: anonymous like/chat frames were refused before any limit applied, without limit.
    async with open_viewer(server.url, room["id"]) as anon:
        for _ in range(40):
            await anon.like()
        events, close = await anon.expect_close()
        assert close is not None and close.code == 1008, close
        assert {e["code"] for e in errors_in(events)} <= {"login_required"}
        assert len(errors_in(events)) < 40


async def test_anonymous_chat_flood_is_closed_with_1008(server: ServerProcess, room: dict[str, Any]) -> None:
    async with open_viewer(server.url, room["id"]) as anon:
        for i in range(40):
            await anon.chat(f"let me in {i}")
        events, close = await anon.expect_close()
        assert close is not None and close.code == 1008, close
        errors = errors_in(events)
        assert {e["code"] for e in errors} == {"login_required"}
        assert 10 <= len(errors) < 40, len(errors)


async def test_chat_rate_limit(server: ServerProcess, room: dict[str, Any], user: Actor) -> None:
    async with open_viewer(server.url, room["id"], user.token) as v:
        for i in range(8):
            await v.chat(f"fast {i}")
        errors: list[dict[str, Any]] = []
        accepted: list[str] = []
        while len(errors) + len(accepted) < 8:
            event = await v.expect(lambda e: e["type"] in ("chat", "error"))
            if event["type"] == "error":
                errors.append(event)
            else:
                accepted.append(event["text"])
        assert len(accepted) >= 5  # the burst
        assert errors, "8 messages at once must exceed 2 a second with a burst of 5"
        for error in errors:
            assert error["code"] == "rate_limited"
            assert set(error) == {"type", "code", "message", "retry_after_ms"}
            assert isinstance(error["retry_after_ms"], int) and 0 < error["retry_after_ms"] <= 500, error
        assert accepted[:5] == [f"fast {i}" for i in range(5)]  # the first ones went out, in order
        assert accepted == sorted(accepted)
        await still_open(v)


async def test_chat_rate_limit_is_per_user_across_connections(server: ServerProcess, room: dict[str, Any],
                                                              user: Actor) -> None:
    async with open_viewer(server.url, room["id"], user.token, label="tab 1") as tab1, \
            open_viewer(server.url, room["id"], user.token, label="tab 2") as tab2:
        for i in range(5):
            await tab1.chat(f"tab1 {i}")
        await tab1.expect(chat_text("tab1 4"))
        # On its own, this connection is within the burst; the user is not.
        for i in range(5):
            await tab2.chat(f"tab2 {i}")
        error = await tab2.expect_error("rate_limited")
        assert error["retry_after_ms"] > 0


async def test_other_viewers_notice_none_of_the_abuse(server: ServerProcess, api: httpx.AsyncClient,
                                                      room: dict[str, Any], user: Actor) -> None:
    bystander = await guest(api, "Bystander")
    async with open_viewer(server.url, room["id"], bystander.token, label="bystander") as b, \
            open_viewer(server.url, room["id"], label="anonymous watcher") as w:
        async with open_viewer(server.url, room["id"], user.token, label="abuser") as abuser, \
                open_viewer(server.url, room["id"], label="anonymous abuser") as anon:
            for frame in ["junk", '{"type": "dance"}', b"\x01", '{"type": "like", "count": 99}']:
                await abuser.send(frame)
            await abuser.chat("   ")
            for i in range(7):
                await abuser.chat(f"spam {i}")
            await anon.chat("anon says hi")
            await abuser.expect(lambda e: e["type"] == "error" and e["code"] == "rate_limited", what="rate_limited")
            await anon.expect_error("login_required")
            for _ in range(40):
                await abuser.like()
            _, close = await abuser.expect_close()
            assert close is not None and close.code == 1008
        seen = await sync_point(b, [b, w])
        for events in seen:
            assert errors_in(events) == [], events
            assert "anon says hi" not in chats_in(events)
            assert all(t.startswith("spam ") or t.startswith("sync-") for t in chats_in(events)), chats_in(events)


# --- 10. handshake: origin, session, room ----------------------------------------------------------------

async def refused_status(server: ServerProcess, room_id: str, **kwargs: Any) -> int:
    with pytest.raises(InvalidStatus) as info:
        async with connect(ws_url(server.url, room_id), proxy=None, open_timeout=10, **kwargs):
            pass
    return info.value.response.status_code


@pytest.mark.parametrize("origin", ["http://evil.example", "null", "http://127.0.0.1:{port}.evil.io",
                                    "https://127.0.0.1:{port}", "http://localhost:{port}", "http://127.0.0.1",
                                    "http://127.0.0.1:{port}/path", "http://user@127.0.0.1:{port}", "127.0.0.1:{port}",
                                    ""])
async def test_foreign_origins_are_refused_before_the_socket_opens(server: ServerProcess, room: dict[str, Any],
                                                                   origin: str) -> None:
    header = origin.format(port=server.port)
    assert await refused_status(server, room["id"], additional_headers={"Origin": header}) == 403


async def test_foreign_origin_is_refused_even_with_a_valid_cookie(server: ServerProcess, room: dict[str, Any],
                                                                  user: Actor) -> None:
    headers = {"Origin": "http://evil.example", "Cookie": f"livesale_session={user.token}"}
    assert await refused_status(server, room["id"], additional_headers=headers) == 403


@pytest.mark.parametrize("origin", ["http://127.0.0.1:{port}", "HTTP://127.0.0.1:{port}"])
async def test_own_origin_is_accepted(server: ServerProcess, room: dict[str, Any], user: Actor,
                                      origin: str) -> None:
    async with open_viewer(server.url, room["id"], user.token, origin=origin.format(port=server.port)) as v:
        assert v.welcome is not None and v.welcome["you"]["user_id"] == user.user_id


async def test_cookie_authenticates_like_a_bearer_token(server: ServerProcess, room: dict[str, Any],
                                                        user: Actor) -> None:
    async with open_viewer(server.url, room["id"], cookie=user.token,
                           origin=f"http://127.0.0.1:{server.port}") as v, \
            open_viewer(server.url, room["id"], label="watcher") as watcher:
        assert v.welcome is not None
        assert v.welcome["you"] == {"user_id": user.user_id, "name": user.name, "role": "viewer",
                                    "is_host": False}
        await v.chat("via cookie")
        event = await watcher.expect(chat_text("via cookie"))
        assert event["user"] == {"id": user.user_id, "name": user.name}


async def test_a_token_in_the_query_string_is_ignored(server: ServerProcess, room: dict[str, Any],
                                                      user: Actor) -> None:
    async with connect(ws_url(server.url, room["id"]) + f"?token={user.token}&access_token={user.token}",
                       proxy=None, open_timeout=10) as ws:
        v = Viewer(ws, "query")
        welcome = await v.expect_type("welcome")
        assert welcome["you"] is None
        await v.chat("hi")
        await v.expect_error("login_required")


async def session_refused(server: ServerProcess, room_id: str, code: str, **kwargs: Any) -> None:
    async with open_viewer(server.url, room_id, welcome=False, **kwargs) as v:
        events, close = await v.expect_close()
    assert [e["type"] for e in events] == ["error"], events
    assert events[0]["code"] == code and events[0]["message"], events
    assert close is not None and close.code == 4401, close


async def test_invalid_sessions_get_an_error_then_4401(server: ServerProcess, api: httpx.AsyncClient,
                                                       room: dict[str, Any], user: Actor) -> None:
    token = user.token
    await session_refused(server, room["id"], "invalid_token", token="not-a-token")
    tampered = token[:-3] + ("AAA" if token[-3:] != "AAA" else "BBB")
    await session_refused(server, room["id"], "invalid_token", token=tampered)
    await session_refused(server, room["id"], "invalid_token", cookie=tampered)
    await session_refused(server, room["id"], "invalid_token", headers={"Authorization": f"Basic {token}"})
    # signed with another key
    other = craft_token("another-secret-" + "x" * 40, {"u": user.user_id, "s": "x", "r": "viewer", "n": "X"})
    await session_refused(server, room["id"], "invalid_token", token=other)
    # signed with the server's key, but older than the token lifetime (7 days)
    secret = server.env["LIVESALE_SECRET_KEY"]
    old = craft_token(secret, {"u": user.user_id, "s": "old", "r": "viewer", "n": "Old"}, age_s=8 * 24 * 3600)
    await session_refused(server, room["id"], "session_expired", token=old)
    # a role the server does not know
    odd = craft_token(secret, {"u": user.user_id, "s": "odd", "r": "admin", "n": "Odd"})
    await session_refused(server, room["id"], "invalid_token", token=odd)


async def test_a_logged_out_session_gets_4401(server: ServerProcess, api: httpx.AsyncClient, room: dict[str, Any],
                                              user: Actor) -> None:
    r = await api.post("/api/auth/logout", headers=user.auth)
    assert r.status_code == 200, r.text
    await session_refused(server, room["id"], "session_revoked", token=user.token)
    await session_refused(server, room["id"], "session_revoked", cookie=user.token)


async def test_logging_out_closes_that_sessions_open_sockets_only(server: ServerProcess, api: httpx.AsyncClient,
                                                                  room: dict[str, Any]) -> None:
    account = await register(api, "viewer", password="correct horse battery")
    r = await api.post("/api/auth/login", json={"username": account.username, "password": "correct horse battery"})
    assert r.status_code == 200, r.text
    second_session = r.json()["token"]
    async with open_viewer(server.url, room["id"], account.token, label="session 1") as s1, \
            open_viewer(server.url, room["id"], account.token, label="session 1, tab 2") as s1b, \
            open_viewer(server.url, room["id"], second_session, label="session 2") as s2:
        r = await api.post("/api/auth/logout", headers=account.auth)
        assert r.status_code == 200, r.text
        for v in (s1, s1b):
            events, close = await v.expect_close()
            assert close is not None and close.code == 4401, close
            assert [e for e in events if e["type"] not in ("viewers", "error")] == [], events
        await still_open(s2)
        await s2.chat("still here")
        await s2.expect(chat_text("still here"))


@pytest.mark.parametrize("room_id", ["{new}", "nonsense", "room_", "ROOM_" + "A" * 26, "room_" + "a" * 200,
                                     "prd_" + "a" * 26, "%20room"])
async def test_unknown_rooms_get_an_error_then_4404(server: ServerProcess, user: Actor, room_id: str) -> None:
    room_id = room_id.format(new=new_id("room"))
    for token in (None, user.token):
        async with open_viewer(server.url, room_id, token, welcome=False) as v:
            events, close = await v.expect_close()
        assert [(e["type"], e["code"]) for e in events] == [("error", "room_not_found")], events
        assert close is not None and close.code == 4404, close


async def test_a_bad_session_is_reported_before_an_unknown_room(server: ServerProcess) -> None:
    await session_refused(server, new_id("room"), "invalid_token", token="garbage")


async def test_only_ping_gets_a_pong_to_the_sender_only(server: ServerProcess, room: dict[str, Any],
                                                        user: Actor) -> None:
    async with open_viewer(server.url, room["id"], user.token) as v, \
            open_viewer(server.url, room["id"], label="watcher") as watcher:
        before = int(time.time() * 1000)
        events = await v.ping()
        assert abs(events[-1]["ts"] - before) < 60_000
        await v.like()
        await watcher.expect_type("likes")
        assert [e for e in watcher.seen if e["type"] == "pong"] == []
        assert of_type("pong")(events[-1])


async def test_one_address_holds_a_bounded_number_of_sockets_per_process(tmp_path: Path) -> None:
    """A script on one address cannot open sockets without end (each a file descriptor and ~33 KiB):
    past the limit (here 5) it gets `too_many_connections` and 1013, and a socket it closes frees a
    place. Other addresses, and the exempt ones, are not held up by it."""
    with ServerProcess(tmp_path / "server", redis_url=None, env={"LIVESALE_MAX_SOCKETS_PER_ADDRESS": "5"}) as srv:
        async with api_client(srv.url) as c:
            room = await create_room(c, (await register(c, "host")), title="Crowded")
        crowd = {"X-Forwarded-For": "203.0.113.50"}  # the proxy on 127.0.0.1 reports the client
        async with AsyncExitStack() as stack:
            held = [await stack.enter_async_context(open_viewer(srv.url, room["id"], label=f"s{i}", headers=crowd))
                    for i in range(5)]
            async with open_viewer(srv.url, room["id"], headers=crowd, welcome=False) as refused:
                events, close = await refused.expect_close()
            assert [e["code"] for e in errors_in(events)] == ["too_many_connections"], events
            assert close is not None and close.code == 1013, close
            async with open_viewer(srv.url, room["id"], headers={"X-Forwarded-For": "203.0.113.51"}) as other, \
                    open_viewer(srv.url, room["id"]) as exempt:
                assert other.welcome is not None and exempt.welcome is not None
            await held.pop().ws.close()
            async def admitted() -> bool:  # its place is free again once the server has seen it go
                async with open_viewer(srv.url, room["id"], headers=crowd, welcome=False) as again:
                    first = await again.expect(lambda e: e["type"] in ("welcome", "error"))
                return first["type"] == "welcome"
            await eventually(admitted, timeout=5, what="a socket of the crowded address admitted again")
            async with api_client(srv.url) as c:
                metrics = (await c.get("/metrics")).text
            assert 'livesale_ws_refused_total{error="too_many_connections"}' in metrics
