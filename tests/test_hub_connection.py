"""server.rooms.hub.Connection: what a viewer's writer gets, in what order, when frames and a close
come before the welcome (while the viewer joins) or after it."""

from __future__ import annotations

from server.rooms import protocol
from server.rooms.hub import QUEUE_FRAMES, Close, Connection


def drain(conn: Connection) -> list[str | Close]:
    return [conn.queue.get_nowait() for _ in range(conn.queue.qsize())]


async def test_frames_before_the_welcome_follow_it() -> None:
    conn = Connection("room_x", None, is_host=False)
    conn.offer("a")
    conn.offer("b")
    assert drain(conn) == []
    conn.start("welcome")
    conn.offer("c")
    assert drain(conn) == ["welcome", "a", "b", "c"]


async def test_a_room_that_ends_while_a_viewer_joins_still_sends_the_welcome_first() -> None:
    """The room's close arrives between the join and the welcome: welcome, then what came
    before the close, then the close; nothing offered after it."""
    conn = Connection("room_x", None, is_host=False)
    conn.offer("before the end")
    conn.close(protocol.NORMAL, "room ended")
    conn.offer("after the end")
    assert conn.closed
    conn.start("welcome")
    assert drain(conn) == ["welcome", "before the end", Close(protocol.NORMAL, "room ended")]


async def test_an_immediate_close_while_joining_sends_nothing_but_the_close() -> None:
    conn = Connection("room_x", None, is_host=False)
    conn.offer("early")
    conn.close(protocol.POLICY, "banned", flush=False)
    conn.start("welcome")
    assert drain(conn) == [Close(protocol.POLICY, "banned")]


async def test_a_viewer_that_falls_behind_is_closed_with_try_again_later() -> None:
    conn = Connection("room_x", None, is_host=False)
    conn.start("welcome")
    for i in range(QUEUE_FRAMES + 5):
        conn.offer(f"f{i}")
    assert drain(conn) == [Close(protocol.TRY_AGAIN_LATER, "too slow: reconnect")]
