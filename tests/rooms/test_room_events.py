"""The room over WebSocket, against the shared real server: welcome state, chat
fan-out and cleaning, likes, pins, viewer counts, moderation, stats and the end
of a room (docs/protocol.md)."""

from __future__ import annotations

import asyncio
import time
from typing import Any, AsyncIterator

import httpx
import pytest
import redis.asyncio as aioredis

from server.ids import new_id
from tests.postgres import on_every_backend
from tests.rooms.support import chat_text, chats_in, errors_in, open_viewer, open_viewers, pin, stats, sync_point
from tests.support import (
    Actor,
    ServerProcess,
    api_client,
    assert_error,
    bearer,
    create_product,
    create_room,
    eventually,
    guest,
    guests,
)

# Every test here that uses a server runs on SQLite, then on PostgreSQL.
server = on_every_backend()

ROOM_KEYS = {"id", "title", "stream_url", "status", "host", "url", "created_at", "started_at", "ended_at"}
WELCOME_KEYS = {"type", "room", "you", "pinned_product", "sale", "likes", "viewers", "history", "server_time"}
CHAT_KEYS = {"type", "id", "user", "text", "ts"}


@pytest.fixture(scope="module")
async def api(server: ServerProcess) -> AsyncIterator[httpx.AsyncClient]:
    async with api_client(server.url) as c:
        yield c


@pytest.fixture
async def room(api: httpx.AsyncClient, host: Actor) -> dict[str, Any]:
    return await create_room(api, host, title="Tea time")


def now_ms() -> int:
    return int(time.time() * 1000)


def check_chat(event: dict[str, Any], user: Actor, text: str) -> None:
    assert set(event) == CHAT_KEYS, event
    assert event["type"] == "chat"
    assert event["id"].startswith("msg_")
    assert event["user"] == {"id": user.user_id, "name": user.name}
    assert event["text"] == text
    assert isinstance(event["ts"], int) and abs(event["ts"] - now_ms()) < 60_000


# --- 1. welcome ----------------------------------------------------------------------------

async def test_welcome_for_an_anonymous_viewer(server: ServerProcess, api: httpx.AsyncClient,
                                               host: Actor) -> None:
    room = await create_room(api, host, title="Morning <b>tea</b>", stream_url="https://cdn.example/live.m3u8")
    async with open_viewer(server.url, room["id"]) as v:
        w = v.welcome
    assert w is not None and set(w) == WELCOME_KEYS, w
    assert set(w["room"]) == ROOM_KEYS  # the pin travels separately, not inside `room`
    assert w["room"]["id"] == room["id"]
    assert w["room"]["title"] == "Morning <b>tea</b>"
    assert w["room"]["stream_url"] == "https://cdn.example/live.m3u8"
    assert w["room"]["status"] == "scheduled"
    assert w["room"]["host"] == {"id": host.user_id, "name": host.name}
    assert w["room"]["url"] == f"/rooms/{room['id']}"
    assert w["room"]["created_at"] == room["created_at"]
    assert w["room"]["started_at"] is None and w["room"]["ended_at"] is None
    assert w["you"] is None
    assert w["pinned_product"] is None
    assert w["sale"] is None
    assert w["likes"] == 0
    assert w["viewers"]["online"] == 1 and w["viewers"]["peak"] == 1  # the anonymous viewer itself counts
    assert w["history"] == []
    assert isinstance(w["server_time"], int) and abs(w["server_time"] - now_ms()) < 60_000


async def test_welcome_for_host_viewer_and_other_host(server: ServerProcess, api: httpx.AsyncClient,
                                                      host: Actor, other_host: Actor,
                                                      room: dict[str, Any]) -> None:
    r = await api.post(f"/api/rooms/{room['id']}/start", headers=host.auth)
    assert r.status_code == 200, r.text
    viewer = await guest(api, "Vic")
    async with open_viewer(server.url, room["id"], host.token, label="host") as h, \
            open_viewer(server.url, room["id"], viewer.token, label="viewer") as v, \
            open_viewer(server.url, room["id"], other_host.token, label="other host") as o:
        assert h.welcome and v.welcome and o.welcome
        assert h.welcome["you"] == {"user_id": host.user_id, "name": host.name, "role": "host", "is_host": True}
        assert v.welcome["you"] == {"user_id": viewer.user_id, "name": "Vic", "role": "viewer", "is_host": False}
        assert o.welcome["you"] == {"user_id": other_host.user_id, "name": other_host.name, "role": "host",
                                    "is_host": False}
        for w in (h.welcome, v.welcome, o.welcome):
            assert w["room"]["status"] == "live"
            assert w["room"]["started_at"] is not None
        # Each connection counts; the peak never goes below the online count.
        assert [w["viewers"]["online"] for w in (h.welcome, v.welcome, o.welcome)] == [1, 2, 3]
        assert o.welcome["viewers"]["peak"] == 3


async def test_welcome_viewers_is_exactly_online_and_peak(server: ServerProcess, room: dict[str, Any]) -> None:
    # Found by this suite: `viewers` used to carry the `"type": "viewers"` tag of the event struct.
    async with open_viewer(server.url, room["id"]) as v:
        assert v.welcome is not None
        assert v.welcome["viewers"] == {"online": 1, "peak": 1}


async def test_welcome_history_is_the_last_50_messages_oldest_first(server: ServerProcess, api: httpx.AsyncClient,
                                                                    room: dict[str, Any]) -> None:
    people = await guests(api, 12, "chatter")
    async with open_viewer(server.url, room["id"], label="observer") as observer, \
            open_viewers(server.url, room["id"], [p.token for p in people]) as chatters:
        # 12 users x 5 messages: each user stays inside the burst of 5 of the chat limit.
        for round_ in range(5):
            for i, c in enumerate(chatters):
                await c.chat(f"msg {i}.{round_}")
        sent = {f"msg {i}.{r}" for i in range(12) for r in range(5)}
        # The order every viewer sees is the order the history was written in.
        order: list[dict[str, Any]] = []
        deadline = asyncio.get_running_loop().time() + 15
        while len(order) < 60 and asyncio.get_running_loop().time() < deadline:
            order.append(await observer.expect_type("chat"))
        assert {e["text"] for e in order} == sent  # none was refused
        for i, person in enumerate(people):  # each user's messages in the order they were sent
            mine = [e for e in order if e["user"]["id"] == person.user_id]
            assert [e["text"] for e in mine] == [f"msg {i}.{r}" for r in range(5)]
    async with open_viewer(server.url, room["id"]) as late:
        assert late.welcome is not None
        history = late.welcome["history"]
    assert len(history) == 50
    assert history == order[-50:]  # the 10 oldest dropped, oldest first, events exactly as broadcast
    for event in history:
        assert set(event) == CHAT_KEYS


# --- 2. chat -----------------------------------------------------------------------------

async def test_chat_reaches_every_viewer(server: ServerProcess, api: httpx.AsyncClient, host: Actor,
                                         room: dict[str, Any]) -> None:
    alice, bob = await guest(api, "Alice"), await guest(api, "Bob")
    async with open_viewer(server.url, room["id"], host.token, label="host") as h, \
            open_viewer(server.url, room["id"], alice.token, label="alice") as a, \
            open_viewer(server.url, room["id"], bob.token, label="bob") as b, \
            open_viewer(server.url, room["id"], label="anonymous") as anon:
        await a.chat("hello everyone")
        got = [await v.expect(chat_text("hello everyone")) for v in (h, a, b, anon)]
        for event in got:
            check_chat(event, alice, "hello everyone")
        assert len({e["id"] for e in got}) == 1  # one message, the same id everywhere
        await h.chat("welcome, Alice")
        for v in (h, a, b, anon):
            check_chat(await v.expect(chat_text("welcome, Alice")), host, "welcome, Alice")


@pytest.mark.parametrize("text", ["<script>alert(1)</script>", "<img src=x onerror=alert(1)>",
                                  "\"quotes\" & 'apostrophes' &amp; \\ backslash", "漢字 and emoji 😀"])
async def test_chat_text_is_delivered_verbatim(server: ServerProcess, api: httpx.AsyncClient, room: dict[str, Any],
                                               text: str) -> None:
    sender = await guest(api, "Mallory")
    async with open_viewer(server.url, room["id"], sender.token) as s, \
            open_viewer(server.url, room["id"], label="other") as other:
        await s.chat(text)
        check_chat(await other.expect_type("chat"), sender, text)
    async with open_viewer(server.url, room["id"]) as late:
        assert late.welcome is not None and [e["text"] for e in late.welcome["history"]] == [text]


@pytest.mark.parametrize(("raw", "cleaned"), [
    ("   padded   ", "padded"),
    ("\x00\x01nul\x7f and \x1b[31mescape", "nul and [31mescape"),
    ("line one\n\nline two\r\n\tindented", "line one line two indented"),
    ("zero\u200bwidth \u202ebidi\u202c and\u2060joiner", "zerowidth bidi andjoiner"),
    ("many     spaces", "many spaces"),
])
async def test_chat_text_is_cleaned(server: ServerProcess, api: httpx.AsyncClient, room: dict[str, Any],
                                    raw: str, cleaned: str) -> None:
    sender = await guest(api)
    async with open_viewer(server.url, room["id"], sender.token) as s, \
            open_viewer(server.url, room["id"], label="other") as other:
        await s.chat(raw)
        event = await other.expect_type("chat")
        check_chat(event, sender, cleaned)


async def test_chat_length_limits(server: ServerProcess, api: httpx.AsyncClient, room: dict[str, Any]) -> None:
    sender = await guest(api)
    async with open_viewer(server.url, room["id"], sender.token, label="sender") as s, \
            open_viewer(server.url, room["id"], label="other") as other:
        for bad in ["", "   ", "\u200b\u200b", "\n\t\r", "x" * 201, "  " + "y" * 201 + "  ",
                    "\u3164\u2800", "\ufe0f\u0301"]:  # the last two print as nothing
            await s.chat(bad)
            await s.expect_error("invalid_text")
            await s.ping()  # the connection stays open
        longest = "漢" * 199 + "z"  # 200 characters (600+ bytes): allowed
        await s.chat("  " + longest + "\n")
        check_chat(await other.expect_type("chat"), sender, longest)
        await s.expect(chat_text(longest))
        assert errors_in(other.seen) == []
        assert chats_in(other.seen) == [longest]  # nothing of the refused messages reached anyone


# --- 3. likes --------------------------------------------------------------------------------

async def test_likes_are_aggregated_and_totals_are_shared(server: ServerProcess, api: httpx.AsyncClient,
                                                          room: dict[str, Any]) -> None:
    a_user, b_user = await guest(api, "A"), await guest(api, "B")
    async with open_viewer(server.url, room["id"], label="watcher") as watcher, \
            open_viewer(server.url, room["id"], a_user.token, label="a") as a, \
            open_viewer(server.url, room["id"], b_user.token, label="b") as b:
        frames = 0
        for _ in range(10):
            await a.like(3)
            frames += 1
        for _ in range(8):
            await b.like(5)
            frames += 1
        await a.like()  # count defaults to 1
        frames += 1
        expected = 10 * 3 + 8 * 5 + 1
        for v in (watcher, a, b):
            events = await v.collect_until(lambda e: e.get("type") == "likes" and e["total"] >= expected,
                                           what=f"likes total {expected}")
            likes = [e for e in events if e["type"] == "likes"]
            assert likes[-1]["total"] == expected
            assert set(likes[-1]) == {"type", "total", "delta"}
            assert sum(e["delta"] for e in likes) == expected
            assert [e["total"] for e in likes] == sorted(e["total"] for e in likes)
            assert len(likes) < frames  # aggregated, never one event per tap or frame
        assert errors_in(a.seen + b.seen) == []
    async with open_viewer(server.url, room["id"]) as late:
        assert late.welcome is not None and late.welcome["likes"] == expected


# --- 4. pins ---------------------------------------------------------------------------------------

async def test_pin_and_unpin_reach_every_viewer(server: ServerProcess, api: httpx.AsyncClient, host: Actor,
                                                room: dict[str, Any]) -> None:
    product = await create_product(api, host, name="Oolong", description="<b>Roasted</b> 漢",
                                   image_url="https://img.example/oolong.png", price_cents=2500)
    viewer = await guest(api)
    async with open_viewer(server.url, room["id"], host.token, label="host") as h, \
            open_viewer(server.url, room["id"], viewer.token, label="viewer") as v, \
            open_viewer(server.url, room["id"], label="anonymous") as anon:
        r = await pin(api, room["id"], product["id"], host)
        assert r.status_code == 200, r.text
        assert r.json()["pinned_product"] == product
        for c in (h, v, anon):
            event = await c.expect_type("pin")
            assert set(event) == {"type", "product"}
            assert event["product"] == product
        async with open_viewer(server.url, room["id"]) as late:
            assert late.welcome is not None and late.welcome["pinned_product"] == product
        r = await api.delete(f"/api/rooms/{room['id']}/pin", headers=host.auth)
        assert r.status_code == 200, r.text
        assert r.json()["pinned_product"] is None
        for c in (h, v, anon):
            assert await c.expect_type("unpin") == {"type": "unpin"}
    async with open_viewer(server.url, room["id"]) as late:
        assert late.welcome is not None and late.welcome["pinned_product"] is None
    r = await api.get(f"/api/rooms/{room['id']}")
    assert r.json()["pinned_product"] is None


async def test_an_edited_product_is_shown_edited_where_it_is_pinned_or_in_the_lineup(
        server: ServerProcess, api: httpx.AsyncClient, host: Actor, room: dict[str, Any]) -> None:
    """Viewers get the edit as a `pin` and a `lineup` event, and a later welcome carries it (it
    carried the copy taken at the pin, old name and price, while GET /api/rooms showed the new)."""
    tote = await create_product(api, host, name="Linen tote", price_cents=1800)
    mug = await create_product(api, host, name="Mug", price_cents=900)
    r = await api.put(f"/api/rooms/{room['id']}/lineup", json={"product_ids": [mug["id"], tote["id"]]},
                      headers=host.auth)
    assert r.status_code == 200, r.text
    assert (await pin(api, room["id"], tote["id"], host)).status_code == 200
    async with open_viewer(server.url, room["id"]) as v:
        r = await api.patch(f"/api/products/{tote['id']}", json={"name": "Linen tote (new)", "price_cents": 999},
                            headers=host.auth)
        assert r.status_code == 200, r.text
        edited = r.json()
        assert (await v.expect_type("pin"))["product"] == edited
        assert [p["name"] for p in (await v.expect_type("lineup"))["products"]] == ["Mug", "Linen tote (new)"]
    async with open_viewer(server.url, room["id"]) as late:
        assert late.welcome is not None and late.welcome["pinned_product"] == edited
    assert (await api.get(f"/api/rooms/{room['id']}")).json()["pinned_product"] == edited

    # Pinned no more: an edit of it leaves the pin alone.
    assert (await pin(api, room["id"], mug["id"], host)).status_code == 200
    r = await api.patch(f"/api/products/{tote['id']}", json={"name": "Linen tote (newer)"},
                        headers=host.auth)
    assert r.status_code == 200, r.text
    async with open_viewer(server.url, room["id"]) as late:
        assert late.welcome is not None and late.welcome["pinned_product"]["id"] == mug["id"]


async def test_pin_refusals(server: ServerProcess, api: httpx.AsyncClient, host: Actor,
                            other_host: Actor, room: dict[str, Any]) -> None:
    mine = await create_product(api, host)
    theirs = await create_product(api, other_host)
    viewer = await guest(api)
    async with open_viewer(server.url, room["id"], viewer.token, label="watcher") as watcher:
        cases = [
            (viewer, mine["id"], 403, "host_only"),
            (other_host, mine["id"], 403, "not_owner"),     # not their room
            (other_host, theirs["id"], 403, "not_owner"),   # their product, still not their room
            (host, theirs["id"], 403, "not_owner"),         # another host's product
            (host, new_id("prd"), 404, "product_not_found"),
            (host, "nonsense", 404, "product_not_found"),
        ]
        for who, product_id, status, code in cases:
            r = await pin(api, room["id"], product_id, who)
            assert r.status_code == status, (code, r.text)
            assert r.json()["error"] == code, r.text
        r = await api.post(f"/api/rooms/{room['id']}/pin", json={"product_id": mine["id"]})
        assert r.status_code == 401, r.text
        r = await pin(api, new_id("room"), mine["id"], host)
        assert r.status_code == 404, r.text
        # None of that reached the room.
        events = (await sync_point(watcher, [watcher]))[0]
        assert [e for e in events if e["type"] in ("pin", "unpin")] == []
    # An ended room cannot be pinned.
    r = await api.post(f"/api/rooms/{room['id']}/end", headers=host.auth)
    assert r.status_code == 200, r.text
    r = await pin(api, room["id"], mine["id"], host)
    assert r.status_code == 409, r.text
    assert r.json()["error"] == "room_ended"


# --- 5. viewers ------------------------------------------------------------------------------------

async def test_viewer_count_follows_joins_and_leaves(server: ServerProcess, api: httpx.AsyncClient,
                                                     room: dict[str, Any]) -> None:
    async with open_viewer(server.url, room["id"], label="watcher") as watcher:
        assert watcher.welcome is not None and watcher.welcome["viewers"]["online"] == 1
        async with open_viewers(server.url, room["id"], [None, None, None]):
            event = await watcher.expect(lambda e: e["type"] == "viewers" and e["online"] == 4, timeout=10,
                                         what="4 online")
            assert event["peak"] == 4
            assert set(event) == {"type", "online", "peak"}
            async with open_viewer(server.url, room["id"]) as fifth:
                assert fifth.welcome is not None and fifth.welcome["viewers"]["online"] == 5
                await watcher.expect(lambda e: e["type"] == "viewers" and e["online"] == 5, timeout=10,
                                     what="5 online")
        event = await watcher.expect(lambda e: e["type"] == "viewers" and e["online"] == 1, timeout=10,
                                     what="back to 1 online")
        assert event["peak"] == 5  # the peak stays
        counts = [e["online"] for e in watcher.seen if e["type"] == "viewers"]
        assert all(1 <= n <= 5 for n in counts), counts


# --- 6. moderation ------------------------------------------------------------------------------------

async def test_host_deletes_a_message(server: ServerProcess, api: httpx.AsyncClient, host: Actor,
                                      room: dict[str, Any]) -> None:
    writer = await guest(api, "Troll")
    async with open_viewer(server.url, room["id"], host.token, label="host") as h, \
            open_viewer(server.url, room["id"], writer.token, label="writer") as w, \
            open_viewer(server.url, room["id"], label="watcher") as watcher:
        await w.chat("keep me")
        await w.chat("delete me")
        doomed = await watcher.expect(chat_text("delete me"))
        r = await api.delete(f"/api/rooms/{room['id']}/chat/{doomed['id']}", headers=host.auth)
        assert r.status_code == 200, r.text
        assert r.json() == {"id": doomed["id"], "in_history": True}
        for v in (h, w, watcher):
            assert await v.expect_type("chat_deleted", id=doomed["id"]) == {"type": "chat_deleted",
                                                                            "id": doomed["id"]}
        # A message no longer in the history (or never sent) is still announced.
        ghost = new_id("msg")
        r = await api.delete(f"/api/rooms/{room['id']}/chat/{ghost}", headers=host.auth)
        assert r.status_code == 200 and r.json() == {"id": ghost, "in_history": False}, r.text
        await watcher.expect_type("chat_deleted", id=ghost)
        r = await api.delete(f"/api/rooms/{room['id']}/chat/not-an-id", headers=host.auth)
        assert r.status_code == 404 and r.json()["error"] == "message_not_found", r.text
    async with open_viewer(server.url, room["id"]) as late:
        assert late.welcome is not None
        assert [e["text"] for e in late.welcome["history"]] == ["keep me"]


async def test_muted_user_is_refused_until_unmuted(server: ServerProcess, api: httpx.AsyncClient,
                                                   host: Actor, room: dict[str, Any]) -> None:
    loud, quiet = await guest(api, "Loud"), await guest(api, "Quiet")
    async with open_viewer(server.url, room["id"], host.token, label="host") as h, \
            open_viewer(server.url, room["id"], loud.token, label="loud") as lv, \
            open_viewer(server.url, room["id"], quiet.token, label="quiet") as qv:
        r = await api.post(f"/api/rooms/{room['id']}/mutes", json={"user_id": loud.user_id, "duration_s": 600},
                           headers=host.auth)
        assert r.status_code == 200, r.text
        assert r.json()["user_id"] == loud.user_id and r.json()["until"]
        assert r.json()["name"] == "Loud"  # the host mutes people by what they said, not by id
        r = await api.get(f"/api/rooms/{room['id']}/mutes", headers=host.auth)
        assert r.status_code == 200, r.text
        assert [(m["user_id"], m["name"]) for m in r.json()] == [(loud.user_id, "Loud")]

        await lv.chat("can you hear me")
        error = await lv.expect_error("muted")
        assert "retry_after_ms" not in error
        rejected = await h.expect_type("chat_rejected")
        assert set(rejected) == {"type", "user", "text", "reason", "ts"}
        assert rejected["user"] == {"id": loud.user_id, "name": "Loud"}
        assert rejected["text"] == "can you hear me" and rejected["reason"] == "muted"
        # Only the host hears of it; the others see nothing.
        seen_by = await sync_point(qv, [lv, qv])
        for events in seen_by:
            assert "can you hear me" not in chats_in(events)
            assert [e for e in events if e["type"] == "chat_rejected"] == []
        assert errors_in(qv.seen) == []

        r = await api.delete(f"/api/rooms/{room['id']}/mutes/{loud.user_id}", headers=host.auth)
        assert r.status_code == 200, r.text
        r = await api.get(f"/api/rooms/{room['id']}/mutes", headers=host.auth)
        assert r.json() == []
        r = await api.delete(f"/api/rooms/{room['id']}/mutes/{loud.user_id}", headers=host.auth)
        assert r.status_code == 404 and r.json()["error"] == "not_muted", r.text
        await lv.chat("back again")
        for v in (h, lv, qv):
            check_chat(await v.expect(chat_text("back again")), loud, "back again")


async def test_mute_input_checks(api: httpx.AsyncClient, host: Actor, room: dict[str, Any]) -> None:
    url = f"/api/rooms/{room['id']}/mutes"
    r = await api.post(url, json={"user_id": host.user_id}, headers=host.auth)
    assert r.status_code == 422, r.text  # not yourself
    r = await api.post(url, json={"user_id": "nobody"}, headers=host.auth)
    assert r.status_code == 422, r.text
    # No account has this id: refused, so mutes of made-up ids cannot pile up in the room.
    assert_error(await api.post(url, json={"user_id": new_id("usr")}, headers=host.auth),
                 404, "user_not_found")
    for duration in (0, 7 * 24 * 3600 + 1, "60"):
        r = await api.post(url, json={"user_id": new_id("usr"), "duration_s": duration}, headers=host.auth)
        assert r.status_code == 422, r.text


async def test_banned_words_refuse_messages(server: ServerProcess, api: httpx.AsyncClient, host: Actor,
                                            room: dict[str, Any]) -> None:
    writer, reader = await guest(api, "Writer"), await guest(api, "Reader")
    async with open_viewer(server.url, room["id"], host.token, label="host") as h, \
            open_viewer(server.url, room["id"], writer.token, label="writer") as w, \
            open_viewer(server.url, room["id"], reader.token, label="reader") as rd:
        await w.chat("before the rule")  # this process now holds the (empty) word list in its cache
        await rd.expect(chat_text("before the rule"))
        r = await api.put(f"/api/rooms/{room['id']}/banned-words", json={"words": ["SPOILER", "  Ending "]},
                          headers=host.auth)
        assert r.status_code == 200, r.text
        assert r.json() == {"words": ["ending", "spoiler"]}
        r = await api.get(f"/api/rooms/{room['id']}/banned-words", headers=host.auth)
        assert r.json() == {"words": ["ending", "spoiler"]}
        # The PUT tells every process to drop its cached list; once a message published after it has arrived,
        # the notice has been handled here too.
        await sync_point(h, [h, w, rd])

        refused = ["huge Spoiler ahead", "the ENDING is sad", "spo\u200biler hidden with a zero-width space"]
        for text in refused:
            await w.chat(text)
            await w.expect_error("banned_word")
            rejected = await h.expect_type("chat_rejected")
            assert rejected["user"] == {"id": writer.user_id, "name": "Writer"}
            assert rejected["reason"] == "banned_word"
            assert rejected["text"] == text.replace("\u200b", "")
        await h.chat("hosts may say spoiler")  # the host's own messages are not filtered
        await rd.expect(chat_text("hosts may say spoiler"))
        await w.chat("a clean message")
        await rd.expect(chat_text("a clean message"))
        # The reader saw none of it: no refused text, no rejection notice, no error.
        assert [e for e in rd.seen if e["type"] in ("chat_rejected", "error")] == []
        assert errors_in(h.seen) == []
        for v in (h, w, rd):
            assert not set(chats_in(v.seen)) & (set(refused) | {t.replace("\u200b", "") for t in refused})
        r = await api.put(f"/api/rooms/{room['id']}/banned-words", json={"words": []}, headers=host.auth)
        assert r.status_code == 200 and r.json() == {"words": []}


async def test_banned_words_match_full_width_and_other_compatibility_forms(
        server: ServerProcess, api: httpx.AsyncClient, host: Actor, room: dict[str, Any]) -> None:
    """Folded as NFKC, both ways: `ｓｐａｍ` is `spam` (it passed a ban on `spam`), and a word banned
    in full-width letters refuses it in plain ones."""
    r = await api.put(f"/api/rooms/{room['id']}/banned-words", json={"words": ["spam", "\uff33\uff23\uff21\uff2d"]},
                      headers=host.auth)
    assert r.status_code == 200 and r.json() == {"words": ["scam", "spam"]}, r.text
    writer = await guest(api, "Writer")
    async with open_viewer(server.url, room["id"], writer.token, label="writer") as w:
        for text in ("buy \uff53\uff50\uff41\uff4d now", "no scam here", "\u33a1 spam"):
            await w.chat(text)
            await w.expect_error("banned_word")


async def test_banned_words_apply_to_a_viewer_joining_after_the_change(server: ServerProcess,
                                                                       api: httpx.AsyncClient,
                                                                       host: Actor,
                                                                       room: dict[str, Any]) -> None:
    r = await api.put(f"/api/rooms/{room['id']}/banned-words", json={"words": ["scam"]},
                      headers=host.auth)
    assert r.status_code == 200, r.text
    writer = await guest(api)
    async with open_viewer(server.url, room["id"], host.token, label="host") as h, \
            open_viewer(server.url, room["id"], writer.token, label="writer") as w:
        await w.chat("this is a SCAM")
        await w.expect_error("banned_word")
        assert (await h.expect_type("chat_rejected"))["text"] == "this is a SCAM"


MODERATION = [
    ("DELETE", "/api/rooms/{room}/chat/{msg}", None),
    ("POST", "/api/rooms/{room}/mutes", {"user_id": "{usr}", "duration_s": 60}),
    ("GET", "/api/rooms/{room}/mutes", None),
    ("DELETE", "/api/rooms/{room}/mutes/{usr}", None),
    ("GET", "/api/rooms/{room}/banned-words", None),
    ("PUT", "/api/rooms/{room}/banned-words", {"words": ["x"]}),
    ("GET", "/api/rooms/{room}/stats", None),
    ("POST", "/api/rooms/{room}/pin", {"product_id": "{prd}"}),
    ("DELETE", "/api/rooms/{room}/pin", None),
]


@pytest.mark.parametrize(("method", "path", "body"), MODERATION, ids=[f"{m} {p}" for m, p, _ in MODERATION])
async def test_live_endpoints_are_for_the_owner_only(api: httpx.AsyncClient, host: Actor,
                                                     other_host: Actor, room: dict[str, Any],
                                                     method: str, path: str, body: dict[str, Any] | None) -> None:
    viewer = await guest(api)
    ids = {"room": room["id"], "msg": new_id("msg"), "usr": viewer.user_id, "prd": new_id("prd")}
    url = path.format(**ids)
    payload = None if body is None else {k: (v.format(**ids) if isinstance(v, str) else v) for k, v in body.items()}
    for token, status, code in [(None, 401, None), (viewer.token, 403, "host_only"),
                                (other_host.token, 403, "not_owner")]:
        r = await api.request(method, url, json=payload, headers=bearer(token) if token else {})
        assert r.status_code == status, (token and token[:8], r.text)
        if code:
            assert r.json()["error"] == code, r.text
    # Nothing changed.
    r = await api.get(f"/api/rooms/{room['id']}/banned-words", headers=host.auth)
    assert r.json() == {"words": []}
    r = await api.get(f"/api/rooms/{room['id']}/mutes", headers=host.auth)
    assert r.json() == []


async def test_moderating_an_ended_room_is_refused(api: httpx.AsyncClient, host: Actor,
                                                   room: dict[str, Any]) -> None:
    r = await api.post(f"/api/rooms/{room['id']}/end", headers=host.auth)
    assert r.status_code == 200, r.text
    r = await api.delete(f"/api/rooms/{room['id']}/chat/{new_id('msg')}", headers=host.auth)
    assert r.status_code == 409 and r.json()["error"] == "room_ended", r.text
    r = await api.post(f"/api/rooms/{room['id']}/mutes", json={"user_id": new_id("usr")},
                       headers=host.auth)
    assert r.status_code == 409 and r.json()["error"] == "room_ended", r.text


# --- 7. stats ------------------------------------------------------------------------------------------

ROOM_STATS = ("viewers", "peak_viewers", "likes", "chat_messages", "unique_viewers")


async def room_stats(api: httpx.AsyncClient, room_id: str, host: Actor) -> dict[str, Any]:
    """The live figures of the room layer (the stats also carry sales figures, not tested here)."""
    s = await stats(api, room_id, host)
    return {k: s[k] for k in ROOM_STATS}


async def test_stats_reflect_the_room(server: ServerProcess, api: httpx.AsyncClient, host: Actor,
                                      room: dict[str, Any]) -> None:
    assert await room_stats(api, room["id"], host) == {"viewers": 0, "peak_viewers": 0, "likes": 0,
                                                           "chat_messages": 0, "unique_viewers": 0}
    g1, g2 = await guest(api, "One"), await guest(api, "Two")
    async with open_viewer(server.url, room["id"], host.token, label="host") as h, \
            open_viewer(server.url, room["id"], g1.token, label="g1") as v1:
        async with open_viewer(server.url, room["id"], g2.token, label="g2") as v2, \
                open_viewer(server.url, room["id"], g2.token, label="g2 second tab"), \
                open_viewer(server.url, room["id"], label="anonymous"):
            await v1.chat("one")
            await v1.chat("two")
            await v2.chat("three")
            for _ in range(4):
                await v2.like(5)
            await h.expect_all(lambda e: e["type"] == "likes" and e["total"] == 20, chat_text("three"))
            s = await room_stats(api, room["id"], host)
            assert s == {"viewers": 5, "peak_viewers": 5, "likes": 20, "chat_messages": 3,
                         # host, g1 and g2; two tabs of one user and anonymous viewers are not unique viewers
                         "unique_viewers": 3}

        async def two_left() -> dict[str, Any] | None:
            s = await room_stats(api, room["id"], host)
            return s if s["viewers"] == 2 else None

        s = await eventually(two_left, what="viewers back to 2")
        assert s == {"viewers": 2, "peak_viewers": 5, "likes": 20, "chat_messages": 3, "unique_viewers": 3}

    async def empty() -> bool:
        return bool((await room_stats(api, room["id"], host))["viewers"] == 0)

    await eventually(empty, what="no viewers")


# --- 8. the end of a room ----------------------------------------------------------------------------

async def test_ending_a_room_closes_every_viewer(server: ServerProcess, api: httpx.AsyncClient, host: Actor,
                                                 room: dict[str, Any]) -> None:
    r = await api.post(f"/api/rooms/{room['id']}/start", headers=host.auth)
    assert r.status_code == 200, r.text
    viewer = await guest(api)
    async with open_viewer(server.url, room["id"], host.token, label="host") as h, \
            open_viewer(server.url, room["id"], viewer.token, label="viewer") as v, \
            open_viewer(server.url, room["id"], label="anonymous") as anon:
        await v.chat("bye")
        for c in (h, v, anon):
            await c.expect(chat_text("bye"))
        r = await api.post(f"/api/rooms/{room['id']}/end", headers=host.auth)
        assert r.status_code == 200, r.text
        assert r.json()["status"] == "ended"
        for c in (h, v, anon):
            events, close = await c.expect_close()
            kinds = [e["type"] for e in events]
            assert "room_ended" in kinds, kinds
            ended = events[kinds.index("room_ended")]
            assert set(ended) == {"type", "ts"} and isinstance(ended["ts"], int)
            # The status change comes first, then room_ended, and nothing after it.
            updates = [e for e in events[:kinds.index("room_ended")] if e["type"] == "room"]
            assert updates and updates[-1]["room"]["status"] == "ended", events
            assert updates[-1]["room"]["ended_at"] is not None
            assert kinds[-1] == "room_ended", kinds
            assert close is not None and close.code == 1000, close


async def test_connecting_to_an_ended_room(server: ServerProcess, api: httpx.AsyncClient, host: Actor,
                                           room: dict[str, Any]) -> None:
    viewer = await guest(api)
    async with open_viewer(server.url, room["id"], viewer.token) as v:
        await v.chat("last words")
        await v.expect(chat_text("last words"))
        r = await api.post(f"/api/rooms/{room['id']}/end", headers=host.auth)
        assert r.status_code == 200, r.text
        await v.expect_close()
    for token in (viewer.token, None, host.token):
        async with open_viewer(server.url, room["id"], token) as late:
            assert late.welcome is not None
            assert late.welcome["room"]["status"] == "ended"
            assert late.welcome["room"]["ended_at"] is not None
            assert [e["text"] for e in late.welcome["history"]] == ["last words"]
            events, close = await late.expect_close()
            assert events == [] or all(e["type"] == "viewers" for e in events), events
            assert close is not None and close.code == 1000


async def test_connecting_right_after_the_room_ended_elsewhere(server: ServerProcess, api: httpx.AsyncClient,
                                                               host: Actor, room: dict[str, Any],
                                                               redis_url: str) -> None:
    """Found by this suite: the hub kept a room's meta cached after it let go of the room's channel, so the
    `meta` update of the end never reached it, and a viewer connecting within META_TTL_S (5 s) got a welcome
    with the old status and was never closed."""
    channel = "{room:" + room["id"] + "}:events"
    redis = aioredis.from_url(redis_url)
    try:
        started = time.monotonic()
        async with open_viewer(server.url, room["id"]) as v:  # this process now caches the room's meta
            assert v.welcome is not None and v.welcome["room"]["status"] == "scheduled"

        async def unsubscribed() -> bool:  # the hub let go of the room's channel
            counts = await redis.execute_command("PUBSUB", "SHARDNUMSUB", channel)  # type: ignore[no-untyped-call]
            numsub = await redis.execute_command("PUBSUB", "NUMSUB", channel)  # type: ignore[no-untyped-call]
            return int(counts[1]) == 0 and int(numsub[1]) == 0

        await eventually(unsubscribed, timeout=5, what="room channel unsubscribed")
        r = await api.post(f"/api/rooms/{room['id']}/end", headers=host.auth)
        assert r.status_code == 200, r.text
        async with open_viewer(server.url, room["id"]) as late:
            if time.monotonic() - started > 4.5:
                pytest.skip("too slow to connect inside the 5 s meta cache window; the case was not exercised")
            assert late.welcome is not None
            assert late.welcome["room"]["status"] == "ended"
            _, close = await late.expect_close()
            assert close is not None and close.code == 1000
    finally:
        await redis.aclose()
