"""Rooms: create, list (ordering and filters), read, edit, start and end."""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import Any

import httpx
import pytest

from server.ids import new_id
from tests.postgres import on_every_backend
from tests.support import Actor, assert_error, create_product, create_room, register

# Every test here that uses a server runs on SQLite, then on PostgreSQL.
server = on_every_backend()

RANK = {"live": 0, "scheduled": 1, "ended": 2}


async def transition(api: httpx.AsyncClient, room: dict[str, Any], action: str, host: Actor) -> dict[str, Any]:
    r = await api.post(f"/api/rooms/{room['id']}/{action}", headers=host.auth)
    assert r.status_code == 200, r.text
    return dict(r.json())


async def test_create_room_is_scheduled(api: httpx.AsyncClient, host: Actor) -> None:
    r = await api.post("/api/rooms", json={"title": "  Morning\u200b tea  "}, headers=host.auth)
    assert r.status_code == 201, r.text
    room = r.json()
    assert set(room) == {"id", "title", "stream_url", "status", "host", "pinned_product", "url", "created_at",
                         "started_at", "ended_at"}
    assert room["id"].startswith("room_")
    assert room["title"] == "Morning tea"
    assert room["status"] == "scheduled"
    assert room["host"] == {"id": host.user_id, "name": host.name}
    assert room["url"] == f"/rooms/{room['id']}"
    assert room["stream_url"] is None
    assert room["pinned_product"] is None
    assert room["started_at"] is None and room["ended_at"] is None
    datetime.fromisoformat(room["created_at"].replace("Z", "+00:00"))


@pytest.mark.parametrize("stream_url", ["https://stream.example/live.m3u8", "http://127.0.0.1:8080/hls?x=1"])
async def test_create_room_with_stream_url(api: httpx.AsyncClient, host: Actor, stream_url: str) -> None:
    room = await create_room(api, host, stream_url=stream_url)
    assert room["stream_url"] == stream_url
    assert (await api.get(f"/api/rooms/{room['id']}")).json() == room


@pytest.mark.parametrize(("body", "field"), [
    ({"title": "t", "stream_url": "javascript:alert(1)"}, "stream_url"),
    ({"title": "t", "stream_url": "ftp://stream.example/x"}, "stream_url"),
    ({"title": "t", "stream_url": "https://stream.example/\u0000"}, "stream_url"),
    ({"title": "t", "stream_url": "rtmp://stream.example/live"}, "stream_url"),
    ({"title": "t", "stream_url": "/relative/path"}, "stream_url"),
    ({"title": "t", "stream_url": "//stream.example/x"}, "stream_url"),
    ({"title": "t", "stream_url": "https://"}, "stream_url"),
    ({"title": "t", "stream_url": "https://a.example/with space"}, "stream_url"),
    ({"title": "t", "stream_url": 5}, "stream_url"),
    ({"title": ""}, "title"),
    ({"title": "   "}, "title"),
    ({"title": "\u0000\u202e"}, "title"),
    ({"title": "x" * 121}, "title"),
    ({"title": None}, "title"),
    ({}, "title"),
    ({"title": "t", "status": "live"}, "status"),
])
async def test_create_room_validation(api: httpx.AsyncClient, host: Actor, body: dict[str, Any],
                                      field: str) -> None:
    assert_error(await api.post("/api/rooms", json=body, headers=host.auth), 422, "invalid", field)


async def test_stream_url_with_trailing_newline_is_refused(api: httpx.AsyncClient, host: Actor) -> None:
    r = await api.post("/api/rooms", json={"title": "t", "stream_url": "https://a.example/x\n"},
                       headers=host.auth)
    assert_error(r, 422, "invalid", "stream_url")


async def test_only_hosts_create_rooms(api: httpx.AsyncClient, viewer: Actor) -> None:
    assert_error(await api.post("/api/rooms", json={"title": "t"}, headers=viewer.auth), 403, "host_only")
    assert_error(await api.post("/api/rooms", json={"title": "t"}), 401, "unauthorized")


async def test_read_room_is_public(api: httpx.AsyncClient, host: Actor, viewer: Actor) -> None:
    room = await create_room(api, host)
    assert (await api.get(f"/api/rooms/{room['id']}")).json() == room
    assert (await api.get(f"/api/rooms/{room['id']}", headers=viewer.auth)).json() == room


@pytest.mark.parametrize("room_id", [new_id("room"), "nope", new_id("prd"), new_id("room").upper(), "room_"])
async def test_unknown_or_malformed_room_is_404(api: httpx.AsyncClient, host: Actor, room_id: str) -> None:
    assert_error(await api.get(f"/api/rooms/{room_id}"), 404, "room_not_found")
    for action in ("start", "end"):
        assert_error(await api.post(f"/api/rooms/{room_id}/{action}", headers=host.auth), 404,
                     "room_not_found")
    r = await api.patch(f"/api/rooms/{room_id}", json={"title": "x"}, headers=host.auth)
    assert_error(r, 404, "room_not_found")


async def test_list_puts_live_first_then_scheduled_then_ended(api: httpx.AsyncClient) -> None:
    h = await register(api, "host")
    ended = await create_room(api, h, title="ended")
    live_old = await create_room(api, h, title="live old")
    scheduled_old = await create_room(api, h, title="scheduled old")
    live_new = await create_room(api, h, title="live new")
    scheduled_new = await create_room(api, h, title="scheduled new")
    await transition(api, ended, "start", h)
    await transition(api, ended, "end", h)
    await transition(api, live_new, "start", h)
    await transition(api, live_old, "start", h)

    r = await api.get("/api/rooms", params={"host_id": h.user_id})
    assert r.status_code == 200
    assert [room["title"] for room in r.json()] == ["live new", "live old", "scheduled new", "scheduled old", "ended"]
    assert [room["status"] for room in r.json()] == ["live", "live", "scheduled", "scheduled", "ended"]

    r = await api.get("/api/rooms", params={"host_id": h.user_id, "status": "scheduled"})
    assert [room["id"] for room in r.json()] == [scheduled_new["id"], scheduled_old["id"]]
    r = await api.get("/api/rooms", params={"host_id": h.user_id, "status": "ended"})
    assert [room["id"] for room in r.json()] == [ended["id"]]
    r = await api.get("/api/rooms", params={"host_id": h.user_id, "limit": "2"})
    assert [room["title"] for room in r.json()] == ["live new", "live old"]


async def test_list_of_all_rooms_is_ordered_by_status(api: httpx.AsyncClient, host: Actor) -> None:
    room = await create_room(api, host)
    await transition(api, room, "start", host)
    r = await api.get("/api/rooms", params={"limit": "100"})
    assert r.status_code == 200
    ranks = [RANK[room["status"]] for room in r.json()]
    assert ranks == sorted(ranks)
    assert 1 <= len(ranks) <= 100


@pytest.mark.parametrize("status", ["live", "scheduled", "ended"])
async def test_status_filter(api: httpx.AsyncClient, status: str) -> None:
    r = await api.get("/api/rooms", params={"status": status})
    assert r.status_code == 200
    assert all(room["status"] == status for room in r.json())


async def test_host_filter(api: httpx.AsyncClient, host: Actor, other_host: Actor) -> None:
    mine = await create_room(api, host)
    theirs = await create_room(api, other_host)
    listed = (await api.get("/api/rooms", params={"host_id": other_host.user_id, "limit": "100"})).json()
    assert all(room["host"]["id"] == other_host.user_id for room in listed)
    assert theirs["id"] in [room["id"] for room in listed]
    assert mine["id"] not in [room["id"] for room in listed]


@pytest.mark.parametrize("host_id", [new_id("usr"), "nobody", new_id("room"), "usr_'; DROP TABLE rooms;--"])
async def test_host_filter_with_unknown_host_is_empty(api: httpx.AsyncClient, host_id: str) -> None:
    r = await api.get("/api/rooms", params={"host_id": host_id})
    assert r.status_code == 200
    assert r.json() == []


async def test_limit(api: httpx.AsyncClient, host: Actor) -> None:
    await create_room(api, host)
    await create_room(api, host)
    assert len((await api.get("/api/rooms", params={"limit": "1"})).json()) == 1
    assert len((await api.get("/api/rooms", params={"limit": "2"})).json()) == 2


@pytest.mark.parametrize(("params", "field"), [
    ({"status": "open"}, "status"),
    ({"status": ""}, "status"),
    ({"status": "LIVE"}, "status"),
    ({"limit": "0"}, "limit"),
    ({"limit": "101"}, "limit"),
    ({"limit": "-1"}, "limit"),
    ({"limit": "1.5"}, "limit"),
    ({"limit": "ten"}, "limit"),
    ({"limit": ""}, "limit"),
    ({"limit": "99999999999999999999999"}, "limit"),
    ({"limit": "9" * 4301}, "limit"),  # past int()'s digit limit: must not be a 500
    ({"limit": "0" * 5000 + "5"}, "limit"),
])
async def test_list_query_validation(api: httpx.AsyncClient, params: dict[str, str], field: str) -> None:
    assert_error(await api.get("/api/rooms", params=params), 422, "invalid", field)


async def test_unicode_digit_limit_is_422(api: httpx.AsyncClient) -> None:
    assert_error(await api.get("/api/rooms", params={"limit": "²"}), 422, "invalid", "limit")


async def test_bad_limit_is_422_even_with_a_malformed_host_id(api: httpx.AsyncClient) -> None:
    assert_error(await api.get("/api/rooms", params={"host_id": "nobody", "limit": "0"}), 422, "invalid", "limit")


async def test_owner_edits_room(api: httpx.AsyncClient, host: Actor) -> None:
    room = await create_room(api, host, stream_url="https://a.example/1")
    r = await api.patch(f"/api/rooms/{room['id']}", json={"title": " New title "}, headers=host.auth)
    assert r.status_code == 200, r.text
    assert r.json()["title"] == "New title"
    assert r.json()["stream_url"] == "https://a.example/1"
    r = await api.patch(f"/api/rooms/{room['id']}", json={"stream_url": None}, headers=host.auth)
    assert r.json()["stream_url"] is None
    assert r.json()["title"] == "New title"
    r = await api.patch(f"/api/rooms/{room['id']}", json={"stream_url": "https://b.example/2"},
                        headers=host.auth)
    assert (await api.get(f"/api/rooms/{room['id']}")).json() == r.json()
    assert r.json()["stream_url"] == "https://b.example/2"


@pytest.mark.parametrize(("change", "field"), [
    ({"title": "  "}, "title"),
    ({"title": None}, "title"),
    ({"stream_url": "javascript:alert(1)"}, "stream_url"),
    ({"status": "ended"}, "status"),
    ({"host_id": "usr_aaaaaaaaaaaaaaaaaaaaaaaaaa"}, "host_id"),
])
async def test_edit_room_validation(api: httpx.AsyncClient, host: Actor, change: dict[str, Any],
                                    field: str) -> None:
    room = await create_room(api, host)
    r = await api.patch(f"/api/rooms/{room['id']}", json=change, headers=host.auth)
    assert_error(r, 422, "invalid", field)
    assert (await api.get(f"/api/rooms/{room['id']}")).json() == room


async def test_only_the_owner_edits_a_room(api: httpx.AsyncClient, host: Actor, other_host: Actor,
                                           viewer: Actor) -> None:
    room = await create_room(api, host)
    url = f"/api/rooms/{room['id']}"
    assert_error(await api.patch(url, json={"title": "x"}, headers=other_host.auth), 403, "not_owner")
    assert_error(await api.patch(url, json={"title": "x"}, headers=viewer.auth), 403, "host_only")
    assert_error(await api.patch(url, json={"title": "x"}), 401, "unauthorized")
    assert (await api.get(url)).json() == room


async def test_start_and_end_lifecycle(api: httpx.AsyncClient, host: Actor) -> None:
    room = await create_room(api, host)
    live = await transition(api, room, "start", host)
    assert live["status"] == "live"
    assert live["started_at"] is not None and live["ended_at"] is None
    assert live["started_at"] >= room["created_at"]

    again = await transition(api, room, "start", host)
    assert again == live

    ended = await transition(api, room, "end", host)
    assert ended["status"] == "ended"
    assert ended["started_at"] == live["started_at"]
    assert ended["ended_at"] is not None and ended["ended_at"] >= live["started_at"]
    assert await transition(api, room, "end", host) == ended

    assert_error(await api.post(f"/api/rooms/{room['id']}/start", headers=host.auth), 409, "room_ended")
    assert (await api.get(f"/api/rooms/{room['id']}")).json() == ended


async def test_a_scheduled_room_can_be_ended_but_not_started_after(api: httpx.AsyncClient,
                                                                    host: Actor) -> None:
    room = await create_room(api, host)
    ended = await transition(api, room, "end", host)
    assert ended["status"] == "ended"
    assert ended["started_at"] is None and ended["ended_at"] is not None
    assert_error(await api.post(f"/api/rooms/{room['id']}/start", headers=host.auth), 409, "room_ended")


@pytest.mark.parametrize("action", ["start", "end"])
async def test_only_the_owner_starts_or_ends(api: httpx.AsyncClient, host: Actor,
                                             other_host: Actor, viewer: Actor, action: str) -> None:
    room = await create_room(api, host)
    url = f"/api/rooms/{room['id']}/{action}"
    assert_error(await api.post(url, headers=other_host.auth), 403, "not_owner")
    assert_error(await api.post(url, headers=viewer.auth), 403, "host_only")
    assert_error(await api.post(url), 401, "unauthorized")
    assert (await api.get(f"/api/rooms/{room['id']}")).json()["status"] == "scheduled"


async def test_a_start_racing_an_end_never_revives_the_room(api: httpx.AsyncClient, host: Actor) -> None:
    """Start and end sent at once, again and again: every room ends up ended, and an end answers
    its room ended (a start that read "scheduled" wrote "live" over the end, on both databases)."""
    rooms = [await create_room(api, host) for _ in range(12)]
    for room in rooms:
        start, end = await asyncio.gather(api.post(f"/api/rooms/{room['id']}/start", headers=host.auth),
                                          api.post(f"/api/rooms/{room['id']}/end", headers=host.auth))
        assert end.status_code == 200 and end.json()["status"] == "ended", end.text
        assert start.status_code == 200 or (start.status_code == 409 and start.json()["error"] == "room_ended"), start.text
        r = await api.get(f"/api/rooms/{room['id']}")
        assert r.json()["status"] == "ended", r.text


async def test_saving_a_lineup_twice_at_once_keeps_one_lineup(api: httpx.AsyncClient, host: Actor) -> None:
    """A double click on save: every save answers 200 and the lineup is the one sent (on
    PostgreSQL, each save deleted the old rows and both inserted, a 500)."""
    room = await create_room(api, host)
    ids = [(await create_product(api, host, name=f"P{i}"))["id"] for i in range(4)]
    saves = await asyncio.gather(*(api.put(f"/api/rooms/{room['id']}/lineup", json={"product_ids": ids},
                                           headers=host.auth) for _ in range(8)))
    assert [r.status_code for r in saves] == [200] * 8, [r.text for r in saves if r.status_code != 200]
    r = await api.get(f"/api/rooms/{room['id']}/lineup")
    assert [p["id"] for p in r.json()] == ids
