"""server.rooms.connection.Connection: what a viewer's writer gets, in what order, when frames and a close
come before the welcome (while the viewer joins) or after it; and the hub ending stalled writers."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any, cast

from server.rooms import protocol
from server.rooms.connection import EARLY_FRAMES, SEND_TIMEOUT_S, Close, Connection
from server.rooms.hub import Hub, LocalRoom

QUEUE_FRAMES = 64  # the default of LIVESALE_WS_QUEUE_FRAMES


def drain(conn: Connection) -> list[str | Close]:
    return [conn.queue.get_nowait() for _ in range(conn.queue.qsize())]


async def test_frames_before_the_welcome_follow_it() -> None:
    conn = Connection("room_x", None, is_host=False, queue_frames=QUEUE_FRAMES)
    conn.offer('["a"]')
    conn.offer('["b"]')
    assert drain(conn) == []
    conn.start("welcome")
    conn.offer('["c"]')
    assert drain(conn) == ["welcome", '["a","b"]', '["c"]']


async def test_a_room_that_ends_while_a_viewer_joins_still_sends_the_welcome_first() -> None:
    """The room's close arrives between the join and the welcome: welcome, then what came
    before the close, then the close; nothing offered after it."""
    conn = Connection("room_x", None, is_host=False, queue_frames=QUEUE_FRAMES)
    conn.offer('["before the end"]')
    conn.close(protocol.NORMAL, "room ended")
    conn.offer('["after the end"]')
    assert conn.closed
    conn.start("welcome")
    assert drain(conn) == ["welcome", '["before the end"]', Close(protocol.NORMAL, "room ended")]


def test_what_came_during_a_slow_join_follows_the_welcome_as_one_frame() -> None:
    """A join that took seconds in a busy room gathers more frames than the queue holds: they go
    as one frame, their events in order (they overflowed the queue, and the viewer got 1013
    instead of its welcome)."""
    conn = Connection("room_x", None, is_host=False, queue_frames=QUEUE_FRAMES)
    for i in range(EARLY_FRAMES):
        conn.offer(f'[{{"n":{2 * i}}},{{"n":{2 * i + 1}}}]' if i % 3 else "[]")
    conn.start('[{"type":"welcome"}]')
    welcome, early, *rest = drain(conn)
    assert not conn.closed and rest == []
    assert welcome == '[{"type":"welcome"}]'
    assert isinstance(early, str)
    assert [e["n"] for e in json.loads(early)] == [n for i in range(EARLY_FRAMES) if i % 3 for n in (2 * i, 2 * i + 1)]


async def test_an_immediate_close_while_joining_sends_nothing_but_the_close() -> None:
    conn = Connection("room_x", None, is_host=False, queue_frames=QUEUE_FRAMES)
    conn.offer('["early"]')
    conn.close(protocol.POLICY, "banned", flush=False)
    conn.start("welcome")
    assert drain(conn) == [Close(protocol.POLICY, "banned")]


async def test_a_viewer_that_falls_behind_is_closed_with_try_again_later() -> None:
    conn = Connection("room_x", None, is_host=False, queue_frames=QUEUE_FRAMES)
    conn.start("welcome")
    for i in range(QUEUE_FRAMES + 5):
        conn.offer(f"f{i}")
    assert drain(conn) == [Close(protocol.TRY_AGAIN_LATER, "too slow: reconnect")]


def test_a_viewer_whose_welcome_is_late_holds_a_bounded_number_of_frames() -> None:
    """Frames wait for the welcome (a join, a resync reading the room) only up to a bound."""
    conn = Connection("room_x", None, is_host=False, queue_frames=QUEUE_FRAMES)
    for i in range(EARLY_FRAMES):
        conn.offer(f"f{i}")
    assert not conn.closed
    conn.offer("one too many")
    assert conn.closed and len(conn.early) == EARLY_FRAMES
    conn.start("welcome")
    assert drain(conn) == [Close(protocol.TRY_AGAIN_LATER, "too slow: reconnect")]


class _Idle:
    """Stands in for the hub's collaborators: the tick below touches none of them."""


async def test_the_tick_ends_a_writer_whose_send_waited_too_long_and_only_that_one() -> None:
    idle = cast(Any, _Idle())
    hub = Hub(idle, idle, idle, idle, idle)
    room = LocalRoom("room_x")
    hub.rooms["room_x"] = room
    now = time.monotonic()
    blocked = asyncio.Event()  # never set: each writer waits on it as on a full socket buffer
    conns = {}
    for name, waited in (("stalled", SEND_TIMEOUT_S + 1), ("slow", SEND_TIMEOUT_S - 1), ("idle", None)):
        conn = Connection("room_x", None, is_host=False, queue_frames=QUEUE_FRAMES)
        conn.writer = asyncio.create_task(blocked.wait())
        conn.sending_since = 0.0 if waited is None else now - waited
        room.conns.add(conn)
        conns[name] = conn
    await asyncio.sleep(0)  # the writers start waiting
    hub.tick()
    await asyncio.sleep(0)  # the cancellation is delivered
    assert conns["stalled"].writer is not None and conns["stalled"].writer.cancelled()
    for name in ("slow", "idle"):
        writer = conns[name].writer
        assert writer is not None and not writer.done(), name
        writer.cancel()
