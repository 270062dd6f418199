"""The room layer's link to Redis, in-process against a Valkey of its own (these tests cut its
pub/sub links): the broker's listener never dies, joins are never left waiting, logouts whose
message was lost still close their sockets, and the hub's resync and heartbeat put presence, counts
and welcomes right after an outage."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.asyncio.client import PubSub

from server.auth import REVOKED_KEY, Principal, Sessions
from server.embedded_redis import EmbeddedRedis
from server.ids import new_id
from server.redis_pool import make_listener, make_redis
from server.rooms import broker as broker_module
from server.rooms import keys, protocol
from server.rooms.broker import Broker
from server.rooms.hub import Close, Connection, Hub
from server.rooms.store import Counts, RoomStore
from tests.support import eventually, free_port


@pytest.fixture(scope="module")
def engine_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    engine = EmbeddedRedis(tmp_path_factory.mktemp("valkey-broker"), port=free_port())
    url = engine.start()
    try:
        yield url
    finally:
        engine.stop()


@dataclass
class Layer:
    """One process's room layer: its broker (running), store and hub (ticked by the tests)."""
    redis: Redis
    broker: Broker
    store: RoomStore
    hub: Hub
    sessions: Sessions
    reconnects: int = 0
    fail_next_reconnect: bool = False


def meta_of(room_id: str) -> dict[str, Any]:
    return {"id": room_id, "title": "broker test", "status": "live", "host": {"id": "usr_h", "name": "h"}}


@pytest.fixture
async def layer(engine_url: str) -> AsyncIterator[Layer]:
    redis, listen = make_redis(engine_url, 8), make_listener(engine_url)
    sessions = Sessions("broker-test-secret-" + "b" * 32, 3600, redis)
    hub: Hub

    async def load_meta(room_id: str) -> dict[str, Any] | None:
        return meta_of(room_id)

    async def on_reconnect() -> None:
        the.reconnects += 1
        if the.fail_next_reconnect:
            the.fail_next_reconnect = False
            raise RuntimeError("the database went away during the resync")
        await hub.resync()

    broker = Broker(redis, listen, lambda room_id, data: hub.on_message(room_id, data), on_reconnect,
                    lambda ids: hub.end_sessions(ids), sessions)
    store = RoomStore(redis, broker)
    hub = Hub(store, broker, load_meta)
    the = Layer(redis, broker, store, hub, sessions)
    await broker.detect()
    task = asyncio.create_task(broker.run())
    try:
        await asyncio.wait_for(broker.connected.wait(), 5)
        yield the
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await redis.aclose(close_connection_pool=True)
        await listen.aclose(close_connection_pool=True)


async def cut_pubsub(redis: Redis) -> None:
    """Drop every pub/sub link to the engine, as a network blip or a Redis failover does."""
    killed = await redis.execute_command("CLIENT", "KILL", "TYPE", "pubsub")  # type: ignore[no-untyped-call]
    assert int(killed) >= 1


def drain(conn: Connection) -> list[str | Close]:
    return [conn.queue.get_nowait() for _ in range(conn.queue.qsize())]


async def joined(hub: Hub, principal: Principal | None = None) -> Connection:
    conn = Connection(new_id("room"), principal, is_host=False)
    await hub.join(conn)
    await hub.welcome(conn)
    drain(conn)
    return conn


async def test_a_room_rejoined_while_its_unsubscribe_is_pending_is_ready_at_once(layer: Layer) -> None:
    """The room's last viewer left (the tick dropped it, still subscribed) and, before the listener
    synced, one joins it again while another joins a new room: both joins return."""
    broker = layer.broker
    old, new = new_id("room"), new_id("room")
    await asyncio.wait_for(broker.subscribe(old), 5)
    broker.unsubscribe(old)
    rejoin = asyncio.create_task(broker.subscribe(old))
    first = asyncio.create_task(broker.subscribe(new))
    await asyncio.wait_for(asyncio.gather(rejoin, first), 5)
    assert broker._waiters == {}  # noqa: SLF001  # nobody left waiting, no futures kept


async def test_a_room_joined_while_a_subscribe_is_under_way_is_subscribed_too(
        layer: Layer, monkeypatch: pytest.MonkeyPatch) -> None:
    """A subscribe waits (a full socket buffer, thousands of rooms after a reconnect); a room joined
    meanwhile must reach Redis as well, not be taken for subscribed."""
    first, second = new_id("room"), new_id("room")
    started = asyncio.Event()
    ssubscribe = PubSub.ssubscribe

    async def slow_ssubscribe(self: Any, *args: Any, **kwargs: Any) -> Any:
        if any(first.encode() in (a if isinstance(a, bytes) else str(a).encode()) for a in args):
            started.set()
            await asyncio.sleep(0.2)
        return await ssubscribe(self, *args, **kwargs)
    monkeypatch.setattr(PubSub, "ssubscribe", slow_ssubscribe)
    joining = asyncio.create_task(layer.broker.subscribe(first))
    await asyncio.wait_for(started.wait(), 5)
    await asyncio.wait_for(asyncio.gather(joining, layer.broker.subscribe(second)), 5)
    counts = await layer.redis.execute_command(  # type: ignore[no-untyped-call]
        "PUBSUB", "SHARDNUMSUB", keys.channel(first), keys.channel(second))
    assert [int(n) for n in counts[1::2]] == [1, 1], counts


async def test_a_join_that_gives_up_leaves_no_waiter_behind(layer: Layer) -> None:
    room = new_id("room")
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(layer.broker.subscribe(room), 0)
    assert room not in layer.broker._waiters  # noqa: SLF001


async def test_the_listener_outlives_a_failing_resync_and_events_flow_again(layer: Layer) -> None:
    conn = await joined(layer.hub)
    layer.fail_next_reconnect = True
    await cut_pubsub(layer.redis)
    await eventually(lambda: asyncio.sleep(0, layer.reconnects >= 2), timeout=10, what="a second reconnect")
    await asyncio.wait_for(layer.broker.connected.wait(), 10)
    frames = drain(conn)
    assert frames and '"type":"welcome"' in str(frames[-1])  # the second resync welcomed the viewer again
    await layer.broker.publish(conn.room_id, broker_module.EVERYONE, b'{"type":"probe"}')

    async def delivered() -> bool:
        layer.hub.tick()
        return any('"probe"' in str(f) for f in drain(conn))
    await eventually(delivered, timeout=5, what="an event published after the failed resync")


async def test_a_logout_whose_message_was_lost_closes_its_sockets_at_the_next_sessions_sync(
        layer: Layer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(broker_module, "SESSIONS_RESYNC_S", 0.2)
    await cut_pubsub(layer.redis)  # the next link reads the sessions at the patched interval
    await eventually(lambda: asyncio.sleep(0, layer.reconnects >= 1), timeout=10, what="a reconnect")
    token = layer.sessions.issue("usr_lost", "viewer", "lost")
    principal = await layer.sessions.verify(token)
    conn = await joined(layer.hub, principal)
    # The logout is recorded in Redis, and its message never published (the publish failed).
    await layer.redis.zadd(REVOKED_KEY, {principal.session_id: time.time() + 3600})
    await eventually(lambda: asyncio.sleep(0, conn.closed), timeout=5, what="the socket closed")
    assert drain(conn)[-1] == Close(protocol.SESSION_ENDED, "logged out")


async def test_a_resync_that_cannot_read_the_room_closes_its_viewers_to_reconnect(layer: Layer) -> None:
    conn = await joined(layer.hub)

    async def database_away(room_id: str) -> dict[str, Any] | None:
        raise RuntimeError("the database went away")
    layer.hub.load_meta = database_away
    await layer.hub.resync()
    assert conn.closed
    assert drain(conn) == [Close(protocol.TRY_AGAIN_LATER, "could not resync: reconnect")]


async def test_a_resync_welcomes_every_viewer_of_a_room_from_one_read(layer: Layer) -> None:
    first = await joined(layer.hub)
    second = Connection(first.room_id, None, is_host=False)
    await layer.hub.join(second)
    await layer.hub.welcome(second)
    drain(second)
    reads = 0
    load_meta = layer.hub.load_meta

    async def counting(room_id: str) -> dict[str, Any] | None:
        nonlocal reads
        reads += 1
        return await load_meta(room_id)
    layer.hub.load_meta = counting
    await layer.hub.resync()
    assert reads == 1
    for conn in (first, second):
        frames = drain(conn)
        assert len(frames) == 1 and '"type":"welcome"' in str(frames[0])


async def test_presence_lost_in_an_outage_is_restored_by_the_heartbeat(layer: Layer) -> None:
    """Redis away for longer than presence lasts (or restarted without it): the viewers still here
    count again, and one that left meanwhile does not come back."""
    staying = await joined(layer.hub)
    leaving = Connection(staying.room_id, None, is_host=False)
    await layer.hub.join(leaving)
    await layer.redis.delete(keys.presence(staying.room_id))
    assert (await layer.store.counts(staying.room_id)).online == 0
    await layer.hub.leave(leaving)
    layer.hub.rooms[staying.room_id].conns.add(leaving)  # left during the heartbeat's refresh
    await layer.hub._heartbeat()  # noqa: SLF001
    layer.hub.rooms[staying.room_id].conns.discard(leaving)
    members = await layer.redis.zrange(keys.presence(staying.room_id), 0, -1)
    assert [m.decode() for m in members] == [staying.id]


async def counts_told(hub: Hub, conn: Connection, settle_s: float = 0.5) -> list[str]:
    """Tick until this process's count publishing is done and whatever it published had `settle_s`
    to come back through Redis; the viewers frames the viewer got meanwhile."""
    room = hub.rooms[conn.room_id]
    frames: list[str | Close] = []
    loop = asyncio.get_running_loop()
    deadline, quiet_since = loop.time() + 10, None
    while loop.time() < deadline:
        room.viewers_at = 0.0  # no once-a-second spacing here
        hub.tick()
        await asyncio.sleep(0.05)
        hub.tick()  # deliver what the publish brought back
        frames += drain(conn)
        if room.viewers_dirty or room.recount or room.viewers_busy:
            quiet_since = None
        elif quiet_since is None:
            quiet_since = loop.time()
        elif loop.time() - quiet_since >= settle_s:
            break
    return [f for f in frames if isinstance(f, str) and '"viewers"' in f]


async def test_the_heartbeat_tells_the_room_when_viewers_elsewhere_dropped_out(layer: Layer) -> None:
    """Another process died with three viewers: once their presence lapses, this process's heartbeat
    recounts and publishes the new count; a recount that finds no change publishes nothing."""
    conn = await joined(layer.hub)
    await counts_told(layer.hub, conn)  # the join's own count
    layer.hub.rooms[conn.room_id].viewers_sent = Counts(online=4, peak=4)  # told while the other lived
    await layer.hub._heartbeat()  # noqa: SLF001
    told = await counts_told(layer.hub, conn)
    assert len(told) == 1 and '"online":1' in told[0], told
    await layer.hub._heartbeat()  # noqa: SLF001
    assert await counts_told(layer.hub, conn) == []


class RunTwice:
    """A script whose every call runs twice, the first answer lost: what redis-py's retry does after
    a reply slower than its socket timeout (the first run had done its work)."""

    def __init__(self, script: Any) -> None:
        self.script = script

    async def __call__(self, *args: Any, **kwargs: Any) -> Any:
        await self.script(*args, **kwargs)
        return await self.script(*args, **kwargs)


async def test_a_chat_post_and_a_likes_flush_run_again_by_a_retry_count_once(layer: Layer) -> None:
    """They doubled: the message twice in the history (and every later welcome), the chat counter
    and the like total counted twice, and the events published twice."""
    store, room_id = layer.store, new_id("room")
    store._post, store._likes = RunTwice(store._post), RunTwice(store._likes)  # type: ignore[method-assign]
    event = protocol.Chat(id=new_id("msg"), user=protocol.UserRef(id="usr_a", name="a"), text="once", ts=1)
    assert await store.post_chat(room_id, event.id, "usr_a", protocol.encode(event)) is None
    assert await layer.redis.lrange(keys.history(room_id), 0, -1) == [protocol.encode(event)]
    assert int(await layer.redis.get(keys.chat_count(room_id))) == 1
    assert await store.flush_likes(room_id, {"usr_a": [1, 7], "usr_b": [2, 3]}) == (10, 10)
    assert await store.flush_likes(room_id, {"usr_a": [1, 5]}) == (15, 5)
    assert int(await layer.redis.get(keys.likes(room_id))) == 15


async def test_an_edit_of_a_product_no_longer_pinned_never_pins_it_again(layer: Layer) -> None:
    """The edit read the room's pin from SQL; another product was pinned since: the refresh does
    nothing (it would have brought the old product back, over the newer pin)."""
    room_id = new_id("room")
    old, new = {"id": "prd_old", "name": "Old"}, {"id": "prd_new", "name": "New"}
    await layer.store.set_pin(room_id, new)
    assert not await layer.store.refresh_pin(room_id, {**old, "name": "Old, edited"}, b"E[]")
    assert await layer.redis.hget(keys.state(room_id), "pin") == b'{"id":"prd_new","name":"New"}'
    assert await layer.store.refresh_pin(room_id, {**new, "name": "New, edited"}, b"E[]")
    assert await layer.redis.hget(keys.state(room_id), "pin") == b'{"id":"prd_new","name":"New, edited"}'


async def test_connections_added_back_by_a_heartbeat_raise_the_peak(layer: Layer) -> None:
    """Redis restarted without its data: the heartbeat adds this process's connections back; the
    peak counts them (it stayed 0 under 4 online until someone new joined)."""
    room_id = new_id("room")
    await layer.store.refresh({room_id: ["c1", "c2", "c3", "c4"]})
    assert await layer.store.counts(room_id) == Counts(online=4, peak=4)
    assert await layer.store.leave(room_id, "c1") == Counts(online=3, peak=4)


async def test_a_room_holds_a_bounded_number_of_mutes_and_drops_those_run_out(
        layer: Layer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("server.rooms.store.MAX_MUTES", 3)
    store, room_id = layer.store, new_id("room")
    assert await store.mute(room_id, "usr_brief", 1) is not None
    for user in ("usr_a", "usr_b", "usr_c"):
        assert await store.mute(room_id, user, 60_000) is not None
    assert await store.mute(room_id, "usr_d", 60_000) is None  # full
    assert await store.mute(room_id, "usr_a", 120_000) is not None  # a longer mute of one held: fine
    assert set(await store.mutes(room_id)) == {"usr_a", "usr_b", "usr_c"}
    assert await layer.redis.hlen(keys.mutes(room_id)) == 3  # the one run out is gone, not only hidden
    await store.unmute(room_id, "usr_b")
    assert await store.mute(room_id, "usr_d", 60_000) is not None
