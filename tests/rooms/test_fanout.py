"""Fan-out beyond one socket, on private servers: a slow consumer is dropped
without holding the room back, and two server processes sharing one database
and one Redis serve one room together."""

from __future__ import annotations

import asyncio
import json
import math
import socket
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Iterator

import httpx
import pytest
from websockets.frames import Close

from tests.rooms.support import Event, Viewer, chat_text, errors_in, open_viewer, pin, stats, sync_point
from tests.support import (
    Actor,
    ServerProcess,
    api_client,
    create_product,
    create_room,
    eventually,
    guest,
    guests,
    register,
    server_holds,
)

# --- 11. slow consumer ------------------------------------------------------------------------------------
#
# What the server side does, measured on loopback: the kernel send buffer of the server's socket grows by
# autotuning up to net.ipv4.tcp_wmem[2] (4 MiB here; `ss -tm` showed ~2.8 MB queued with tb=4194304 while the
# client read nothing). Only after that fills does uvicorn's transport buffer pass its 64 KiB high-water mark
# and pause writing; the connection's writer then blocks in send, its queue (LIVESALE_WS_QUEUE_FRAMES=4) fills,
# and the hub drops the viewer. So the flood must exceed tcp_wmem[2] + 64 KiB + a few frames; it is computed
# from /proc below. Pins with maximal, 4-byte-character descriptions and image URLs make ~16 KB events.

QUEUE_FRAMES = 4
EMOJI = "\U0001F375"  # 4 bytes in UTF-8


@dataclass
class SlowRun:
    normal_pins: list[str]              # product ids, in the order the normal viewer received them
    slow_pins: list[str]
    slow_events: list[Event]
    slow_close: Close | None
    viewers_after: int


def flood_size(event_bytes: int) -> int:
    try:
        wmem_max = int(Path("/proc/sys/net/ipv4/tcp_wmem").read_text().split()[2])
    except (OSError, ValueError, IndexError):
        pytest.skip("needs Linux's /proc/sys/net/ipv4/tcp_wmem to size the flood")
    budget = wmem_max + 64 * 1024 + 2 * 1024 * 1024  # server socket + transport buffer + client side and margin
    n = math.ceil(budget / event_bytes) + 4 * QUEUE_FRAMES
    if n > 2000:
        pytest.skip(f"tcp_wmem max {wmem_max} would need {n} pins to overflow; too slow for a test")
    return n


@pytest.fixture(scope="module")
async def slow_run(tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> SlowRun:
    with ServerProcess(tmp_path_factory.mktemp("slow"), redis_url=redis_url,
                       env={"LIVESALE_WS_QUEUE_FRAMES": str(QUEUE_FRAMES)}) as srv:
        async with api_client(srv.url) as api:
            host = await register(api, "host")
            room = await create_room(api, host)
            products = [await create_product(api, host, name=f"Big {i} " + EMOJI * 100,
                                             description=EMOJI * 2000,
                                             image_url="https://img.example/" + EMOJI * 2000)
                        for i in range(8)]
            slow_user, normal_user = await guests(api, 2, "watcher")
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: a small window
                sock.connect(("127.0.0.1", srv.port))
                sock.setblocking(False)
                async with open_viewer(srv.url, room["id"], slow_user.token, label="slow", sock=sock,
                                       max_queue=1, max_size=None, ping_interval=None) as slow, \
                        open_viewer(srv.url, room["id"], normal_user.token, label="normal",
                                    max_size=None, max_queue=None) as normal:
                    event_bytes = len(json.dumps({"type": "pin", "product": products[0]}, ensure_ascii=False,
                                                 separators=(",", ":")).encode())
                    n = flood_size(event_bytes)
                    sem = asyncio.Semaphore(8)

                    async def pin_one(i: int) -> None:
                        async with sem:
                            r = await pin(api, room["id"], products[i % len(products)]["id"], host)
                            assert r.status_code == 200, r.text

                    # The normal viewer reads while the host floods the room.
                    reader = asyncio.create_task(normal_collect(normal, n))
                    try:
                        await asyncio.gather(*(pin_one(i) for i in range(n)))
                        normal_pins = await asyncio.wait_for(reader, 60)
                    finally:
                        reader.cancel()

                    # The server lets go of the slow viewer (its presence is removed) while it still reads nothing.
                    async def only_normal_left() -> int | None:
                        online = (await stats(api, room["id"], host))["viewers"]
                        return online if online == 1 else None

                    viewers_after = await eventually(only_normal_left, timeout=40, interval=0.5,
                                                     what="the slow viewer dropped")
                    # ... and lets go of its socket too, its unsent megabytes with it, though the peer
                    # keeps its window shut: the descriptor is gone within seconds, not held at its will.
                    app = srv.app_pids()[0]

                    async def socket_freed() -> bool:
                        return not server_holds(app, srv.port, sock)
                    await eventually(socket_freed, timeout=20, interval=0.5, what="the slow viewer's socket freed")
                    slow_events, slow_close = await slow.expect_close(timeout=60)
            finally:
                sock.close()
    slow_pins = [e["product"]["id"] for e in slow_events if e["type"] == "pin"]
    return SlowRun(normal_pins=normal_pins, slow_pins=slow_pins, slow_events=slow_events,
                   slow_close=slow_close, viewers_after=viewers_after)


async def normal_collect(viewer: Viewer, n: int) -> list[str]:
    got: list[str] = []
    while len(got) < n:
        event = await viewer.expect_type("pin", timeout=30)
        got.append(event["product"]["id"])
    return got


async def test_a_slow_viewer_is_dropped_and_the_others_get_everything(slow_run: SlowRun) -> None:
    # Every pin reached the viewer that reads.
    assert len(slow_run.normal_pins) >= 200
    assert len(set(slow_run.normal_pins)) == 8
    # The one that did not read was let go by the server (it no longer counts as online) ...
    assert slow_run.viewers_after == 1
    # ... after it got an unbroken first part of the same events, and nothing after the gap.
    assert 0 < len(slow_run.slow_pins) < len(slow_run.normal_pins)
    assert slow_run.slow_pins == slow_run.normal_pins[:len(slow_run.slow_pins)]
    last_pin = max(i for i, e in enumerate(slow_run.slow_events) if e["type"] == "pin")
    assert all(e["type"] == "viewers" for e in slow_run.slow_events[last_pin + 1:]), slow_run.slow_events[last_pin + 1:]
    assert errors_in(slow_run.slow_events) == []
    # Then the connection ended: with the close frame 1013 if the server could still send it, else (what
    # happens when the client stays stalled past the server's 10 s send timeout) without any close frame.
    assert slow_run.slow_close is None or slow_run.slow_close.code == 1013, slow_run.slow_close




# --- 12. two server processes ------------------------------------------------------------------------------

SHOP = "https://shop.example"


@pytest.fixture(scope="module", params=["redis", "cluster"])
def pair(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    """Two processes on one data dir (one SQLite file) and the session's Redis, then its Redis
    Cluster (where a room's channel and the sessions channel may live on different nodes). A
    also allows SHOP as an origin."""
    redis_url: str = request.getfixturevalue("redis_url" if request.param == "redis" else "cluster_url")
    data_dir = tmp_path_factory.mktemp("shared")
    a = ServerProcess(data_dir, redis_url=redis_url, env={"LIVESALE_ALLOWED_ORIGINS": SHOP})
    b = ServerProcess(data_dir, redis_url=redis_url)
    try:
        with ThreadPoolExecutor(2) as pool:  # start both at once (they race to create the schema, as workers do)
            for started in [pool.submit(s.start) for s in (a, b)]:
                started.result()
        yield a, b
    finally:
        a.stop()
        b.stop()


@pytest.fixture(scope="module")
async def apis(pair: tuple[ServerProcess, ServerProcess]) -> AsyncIterator[tuple[httpx.AsyncClient, httpx.AsyncClient]]:
    async with api_client(pair[0].url) as a, api_client(pair[1].url) as b:
        yield a, b


@pytest.fixture(scope="module")
async def pair_host(apis: tuple[httpx.AsyncClient, httpx.AsyncClient]) -> Actor:
    return await register(apis[0], "host")


@pytest.fixture
async def shared_room(apis: tuple[httpx.AsyncClient, httpx.AsyncClient], pair_host: Actor) -> dict[str, Any]:
    room = await create_room(apis[0], pair_host, title="Two processes")
    r = await apis[1].get(f"/api/rooms/{room['id']}")  # B reads what A wrote
    assert r.status_code == 200, r.text
    return room


async def test_chat_crosses_processes_both_ways(pair: tuple[ServerProcess, ServerProcess],
                                               apis: tuple[httpx.AsyncClient, httpx.AsyncClient],
                                               shared_room: dict[str, Any]) -> None:
    a, b = pair
    on_a = await guest(apis[0], "OnA")  # a session from A works on B (same key) and the other way round
    on_b = await guest(apis[1], "OnB")
    rid = shared_room["id"]
    async with open_viewer(a.url, rid, on_a.token, label="A") as va, \
            open_viewer(b.url, rid, on_b.token, label="B") as vb, \
            open_viewer(b.url, rid, on_a.token, label="A's user on B") as va_on_b:
        await va.chat("from A")
        for v in (va, vb, va_on_b):
            event = await v.expect(chat_text("from A"))
            assert event["user"] == {"id": on_a.user_id, "name": "OnA"}
        await vb.chat("from B")
        for v in (va, vb, va_on_b):
            event = await v.expect(chat_text("from B"))
            assert event["user"] == {"id": on_b.user_id, "name": "OnB"}
    for srv in pair:
        async with open_viewer(srv.url, rid) as late:
            assert late.welcome is not None
            assert [e["text"] for e in late.welcome["history"]] == ["from A", "from B"]


async def test_likes_from_both_processes_agree(pair: tuple[ServerProcess, ServerProcess],
                                               apis: tuple[httpx.AsyncClient, httpx.AsyncClient],
                                               pair_host: Actor, shared_room: dict[str, Any]) -> None:
    a, b = pair
    ua, ub = await guest(apis[0], "LA"), await guest(apis[1], "LB")
    rid = shared_room["id"]
    async with open_viewer(a.url, rid, ua.token, label="A") as va, \
            open_viewer(b.url, rid, ub.token, label="B") as vb:
        for _ in range(6):
            await va.like(4)
        for _ in range(5):
            await vb.like(3)
        expected = 6 * 4 + 5 * 3
        for v in (va, vb):
            event = await v.expect(lambda e: e["type"] == "likes" and e["total"] >= expected, timeout=10,
                                   what=f"likes total {expected}")
            assert event["total"] == expected
    for srv in pair:
        async with open_viewer(srv.url, rid) as late:
            assert late.welcome is not None and late.welcome["likes"] == expected
    for api in apis:
        assert (await stats(api, rid, pair_host))["likes"] == expected


async def test_pins_and_room_changes_made_on_one_process_reach_the_other(
        pair: tuple[ServerProcess, ServerProcess], apis: tuple[httpx.AsyncClient, httpx.AsyncClient],
        pair_host: Actor, shared_room: dict[str, Any]) -> None:
    a, b = pair
    product = await create_product(apis[1], pair_host, name="Made on B")
    rid = shared_room["id"]
    async with open_viewer(a.url, rid, label="A") as va, open_viewer(b.url, rid, label="B") as vb:
        r = await pin(apis[1], rid, product["id"], pair_host)  # through B's HTTP API
        assert r.status_code == 200, r.text
        for v in (va, vb):
            assert (await v.expect_type("pin"))["product"] == product
        r = await apis[0].patch(f"/api/rooms/{rid}", json={"title": "Renamed on A"},
                                headers=pair_host.auth)
        assert r.status_code == 200, r.text
        for v in (va, vb):
            event = await v.expect_type("room")
            assert event["room"]["title"] == "Renamed on A"
        r = await apis[0].delete(f"/api/rooms/{rid}/pin", headers=pair_host.auth)
        assert r.status_code == 200, r.text
        for v in (va, vb):
            await v.expect_type("unpin")


async def test_viewer_counts_span_both_processes(pair: tuple[ServerProcess, ServerProcess],
                                                 apis: tuple[httpx.AsyncClient, httpx.AsyncClient],
                                                 pair_host: Actor, shared_room: dict[str, Any]) -> None:
    a, b = pair
    rid = shared_room["id"]
    async with open_viewer(a.url, rid, label="A") as va:
        async with open_viewer(b.url, rid, label="B") as vb:
            assert vb.welcome is not None and vb.welcome["viewers"] == {"online": 2, "peak": 2}
            await va.expect(lambda e: e["type"] == "viewers" and e["online"] == 2, timeout=10, what="2 online")
            async with open_viewer(b.url, rid, label="B2") as vb2:
                assert vb2.welcome is not None and vb2.welcome["viewers"]["online"] == 3
                await va.expect(lambda e: e["type"] == "viewers" and e["online"] == 3, timeout=10, what="3 online")
                for api in apis:
                    s = await stats(api, rid, pair_host)
                    assert (s["viewers"], s["peak_viewers"]) == (3, 3)
        event = await va.expect(lambda e: e["type"] == "viewers" and e["online"] == 1, timeout=10,
                                what="back to 1 online")
        assert event["peak"] == 3


async def test_moderation_spans_processes(pair: tuple[ServerProcess, ServerProcess],
                                          apis: tuple[httpx.AsyncClient, httpx.AsyncClient],
                                          pair_host: Actor, shared_room: dict[str, Any]) -> None:
    a, b = pair
    rid = shared_room["id"]
    talker, other = await guest(apis[1], "Talker"), await guest(apis[0], "Other")
    host_auth = pair_host.auth
    async with open_viewer(a.url, rid, pair_host.token, label="host on A") as h, \
            open_viewer(b.url, rid, talker.token, label="talker on B") as t, \
            open_viewer(a.url, rid, other.token, label="other on A") as o:
        await t.chat("warm-up")  # B now caches the (empty) banned word list
        await o.expect(chat_text("warm-up"))
        r = await apis[0].put(f"/api/rooms/{rid}/banned-words", json={"words": ["Coupon"]}, headers=host_auth)
        assert r.status_code == 200, r.text
        await sync_point(h, [h, t, o])  # the notice to drop cached words has reached B too
        await t.chat("free COUPON here")
        await t.expect_error("banned_word")
        rejected = await h.expect_type("chat_rejected")  # from B's check to the host's socket on A
        assert rejected["reason"] == "banned_word" and rejected["user"]["id"] == talker.user_id

        r = await apis[0].post(f"/api/rooms/{rid}/mutes", json={"user_id": talker.user_id, "duration_s": 60},
                               headers=host_auth)
        assert r.status_code == 200, r.text
        await t.chat("am I muted")
        await t.expect_error("muted")
        assert (await h.expect_type("chat_rejected"))["reason"] == "muted"
        r = await apis[1].delete(f"/api/rooms/{rid}/mutes/{talker.user_id}", headers=host_auth)
        assert r.status_code == 200, r.text

        await t.chat("delete this")
        doomed = await o.expect(chat_text("delete this"))
        r = await apis[1].delete(f"/api/rooms/{rid}/chat/{doomed['id']}", headers=host_auth)
        assert r.status_code == 200 and r.json()["in_history"] is True, r.text
        await o.expect_type("chat_deleted", id=doomed["id"])
        await t.expect_type("chat_deleted", id=doomed["id"])
        seen = await sync_point(h, [o])
        assert errors_in(o.seen) == [] and [e for e in o.seen if e["type"] == "chat_rejected"] == []
        assert "free COUPON here" not in [e.get("text") for e in seen[0]]


async def test_chat_rate_limit_spans_processes(pair: tuple[ServerProcess, ServerProcess],
                                               apis: tuple[httpx.AsyncClient, httpx.AsyncClient],
                                               shared_room: dict[str, Any]) -> None:
    a, b = pair
    user = await guest(apis[0], "Busy")
    async with open_viewer(a.url, shared_room["id"], user.token, label="on A") as va, \
            open_viewer(b.url, shared_room["id"], user.token, label="on B") as vb:
        for i in range(5):
            await va.chat(f"a{i}")
        await va.expect(chat_text("a4"))
        for i in range(5):  # within the burst for this connection, not for this user
            await vb.chat(f"b{i}")
        error = await vb.expect_error("rate_limited")
        assert error["retry_after_ms"] > 0


async def test_ending_on_one_process_closes_viewers_on_the_other(pair: tuple[ServerProcess, ServerProcess],
                                                                 apis: tuple[httpx.AsyncClient, httpx.AsyncClient],
                                                                 pair_host: Actor,
                                                                 shared_room: dict[str, Any]) -> None:
    a, b = pair
    rid = shared_room["id"]
    async with open_viewer(a.url, rid, label="A") as va, open_viewer(b.url, rid, label="B") as vb:
        r = await apis[0].post(f"/api/rooms/{rid}/end", headers=pair_host.auth)
        assert r.status_code == 200, r.text
        for v in (va, vb):
            events, close = await v.expect_close()
            assert [e["type"] for e in events if e["type"] != "viewers"][-1] == "room_ended", events
            assert close is not None and close.code == 1000
    async with open_viewer(b.url, rid) as late:
        assert late.welcome is not None and late.welcome["room"]["status"] == "ended"
        _, close = await late.expect_close()
        assert close is not None and close.code == 1000


async def test_allowed_origins_are_per_process_configuration(pair: tuple[ServerProcess, ServerProcess],
                                                             shared_room: dict[str, Any]) -> None:
    from websockets.exceptions import InvalidStatus

    a, b = pair
    rid = shared_room["id"]
    async with open_viewer(a.url, rid, origin=SHOP) as v:
        assert v.welcome is not None
    async with open_viewer(a.url, rid, origin=SHOP.upper()) as v:  # the same origin, however spelled
        assert v.welcome is not None
    for srv, origin in [(b, SHOP), (a, "https://shop.example.evil.io"), (a, "http://shop.example"),
                        (a, b.url), (b, a.url)]:
        with pytest.raises(InvalidStatus) as info:
            async with open_viewer(srv.url, rid, origin=origin):
                pass
        assert info.value.response.status_code == 403, (srv.url, origin)


async def test_a_room_ended_through_one_process_is_ended_on_the_other(
        pair: tuple[ServerProcess, ServerProcess], apis: tuple[httpx.AsyncClient, httpx.AsyncClient],
        pair_host: Actor, shared_room: dict[str, Any]) -> None:
    a, b = pair
    rid = shared_room["id"]
    async with open_viewer(b.url, rid) as v:  # B has seen the room, then its viewer leaves
        assert v.welcome is not None and v.welcome["room"]["status"] == "scheduled"
    r = await apis[0].post(f"/api/rooms/{rid}/end", headers=pair_host.auth)
    assert r.status_code == 200, r.text
    async with open_viewer(b.url, rid) as late:
        assert late.welcome is not None and late.welcome["room"]["status"] == "ended"
        _, close = await late.expect_close()
        assert close is not None and close.code == 1000


async def test_logging_out_on_one_process_closes_sockets_on_the_other(
        pair: tuple[ServerProcess, ServerProcess], apis: tuple[httpx.AsyncClient, httpx.AsyncClient],
        shared_room: dict[str, Any]) -> None:
    a, b = pair
    user = await guest(apis[1], "Leaving")
    async with open_viewer(b.url, shared_room["id"], user.token, label="on B") as vb, \
            open_viewer(a.url, shared_room["id"], user.token, label="on A") as va, \
            open_viewer(a.url, shared_room["id"], label="bystander") as bystander:
        r = await apis[0].post("/api/auth/logout", headers=user.auth)
        assert r.status_code == 200, r.text
        for v in (vb, va):
            _, close = await v.expect_close()
            assert close is not None and close.code == 4401, close
        await bystander.ping()
