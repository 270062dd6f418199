"""The room layer's link to Redis, in-process against a Valkey of its own (these tests cut its
pub/sub links): the broker's listener never dies, joins are never left waiting, logouts whose
message was lost still close their sockets, and the hub's resync and heartbeat put presence, counts
and welcomes right after an outage."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Iterator
from dataclasses import dataclass
from typing import Any

import msgspec
import pytest
from redis.asyncio import Redis
from redis.asyncio.client import PubSub

from server.auth import REVOKED_KEY, Principal, Sessions
from server.backends.redis_client import make_redis
from server.backends.redis_nodes import Nodes
from server.ids import new_id
from server.ratelimit import CHAT, Limit
from server.rooms import keys, node_link, protocol
from server.rooms.broker import Broker
from server.rooms.connection import Close, Connection
from server.rooms.hub import Hub
from server.rooms.publisher import Publisher
from server.rooms.service import BannedWords
from server.rooms.store import Counts, RoomStore
from server.rooms.welcome import Welcomes
from server.schemas import HostOut, RoomOut
from tests.support import eventually, open_redis, valkey


@pytest.fixture(scope="module")
def engine_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with valkey(tmp_path_factory.mktemp("valkey-broker")) as url:
        yield url


def room_of(room_id: str) -> RoomOut:
    return RoomOut(id=room_id, title="broker test", stream_url=None, status="live", host=HostOut(id="usr_h", name="h"),
                   pinned_product=None, url=f"/rooms/{room_id}", created_at="", started_at=None, ended_at=None)


async def any_room(room_id: str) -> RoomOut | None:
    return room_of(room_id)


@dataclass
class Layer:
    """One process's room layer: its broker (running), store and hub (ticked by the tests). The
    broker's listener is the layer, which counts reconnects (failing one if told) and hands
    everything to the hub; the hub reads rooms through `load_room`, which a test may replace."""
    redis: Redis
    broker: Broker
    store: RoomStore
    hub: Hub
    sessions: Sessions
    reconnects: int = 0
    fail_next_reconnect: bool = False
    load_room: Callable[[str], Awaitable[RoomOut | None]] = any_room

    def on_message(self, room_id: str, data: bytes) -> None:
        self.hub.on_message(room_id, data)

    async def resync(self) -> None:
        """Counted once done (a test that waits for a count then sees what the resync sent)."""
        try:
            if self.fail_next_reconnect:
                self.fail_next_reconnect = False
                raise RuntimeError("the database went away during the resync")
            await self.hub.resync()
        finally:
            self.reconnects += 1

    def end_sessions(self, session_ids: Collection[str]) -> None:
        self.hub.end_sessions(session_ids)


async def no_sale(room_id: str) -> object | None:
    return None


@pytest.fixture
async def layer(engine_url: str) -> AsyncIterator[Layer]:
    redis = make_redis(engine_url, 8)
    sessions = Sessions("broker-test-secret-" + "b" * 32, 3600, redis)
    publisher = await Publisher.detect(redis)
    broker = Broker(Nodes(redis), sessions, sharded=publisher.sharded)
    store = RoomStore(redis, publisher)
    the: Layer

    async def load_room(room_id: str) -> RoomOut | None:
        return await the.load_room(room_id)

    hub = Hub(store, broker, publisher, BannedWords(store), Welcomes(store, load_room, no_sale))
    the = Layer(redis, broker, store, hub, sessions)
    task = asyncio.create_task(broker.run(the))
    try:
        await eventually(lambda: asyncio.sleep(0, broker.is_connected()), timeout=5, what="the pub/sub link")
        yield the
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await redis.aclose(close_connection_pool=True)


async def cut_pubsub(redis: Redis) -> None:
    """Drop every pub/sub link to the engine, as a network blip or a Redis failover does."""
    killed = await redis.execute_command("CLIENT", "KILL", "TYPE", "pubsub")  # type: ignore[no-untyped-call]
    assert int(killed) >= 1


def drain(conn: Connection) -> list[str | Close]:
    return [conn.queue.get_nowait() for _ in range(conn.queue.qsize())]


QUEUE_FRAMES = 64  # the default of LIVESALE_WS_QUEUE_FRAMES


async def joined(hub: Hub, principal: Principal | None = None) -> Connection:
    conn = Connection(new_id("room"), principal, is_host=False, queue_frames=QUEUE_FRAMES)
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
    await eventually(lambda: asyncio.sleep(0, layer.broker.is_connected()), timeout=10, what="the link back")
    frames = drain(conn)
    assert frames and '"type":"welcome"' in str(frames[-1])  # the second resync welcomed the viewer again
    probe = protocol.EVERYONE + b'{"type":"probe"}'
    await Publisher(layer.redis, sharded=layer.broker.sharded).publish(conn.room_id, probe)

    async def delivered() -> bool:
        layer.hub.tick()
        return any('"probe"' in str(f) for f in drain(conn))
    await eventually(delivered, timeout=5, what="an event published after the failed resync")


async def test_a_logout_whose_message_was_lost_closes_its_sockets_at_the_next_sessions_sync(
        layer: Layer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(node_link, "SESSIONS_RESYNC_S", 0.2)
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

    async def database_away(room_id: str) -> RoomOut | None:
        raise RuntimeError("the database went away")
    layer.load_room = database_away
    await layer.hub.resync()
    assert conn.closed
    assert drain(conn) == [Close(protocol.TRY_AGAIN_LATER, "could not resync: reconnect")]


async def test_a_resync_welcomes_every_viewer_of_a_room_from_one_read(layer: Layer) -> None:
    first = await joined(layer.hub)
    second = Connection(first.room_id, None, is_host=False, queue_frames=QUEUE_FRAMES)
    await layer.hub.join(second)
    await layer.hub.welcome(second)
    drain(second)
    reads = 0

    async def counting(room_id: str) -> RoomOut | None:
        nonlocal reads
        reads += 1
        return room_of(room_id)
    layer.load_room = counting
    await layer.hub.resync()
    assert reads == 1
    for conn in (first, second):
        frames = drain(conn)
        assert len(frames) == 1 and '"type":"welcome"' in str(frames[0])


async def test_presence_lost_in_an_outage_is_restored_by_the_heartbeat(layer: Layer) -> None:
    """Redis away for longer than presence lasts (or restarted without it): the viewers still here
    count again, and one that left meanwhile does not come back."""
    staying = await joined(layer.hub)
    leaving = Connection(staying.room_id, None, is_host=False, queue_frames=QUEUE_FRAMES)
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
    assert await store.post_chat(room_id, event.id, "usr_a", protocol.encode(event), rejected=b"{}", banned=False,
                                 limit=CHAT) == ("posted", 0)
    assert await layer.redis.lrange(keys.history(room_id), 0, -1) == [protocol.encode(event)]
    assert int(await layer.redis.get(keys.chat_count(room_id))) == 1
    assert await store.flush_likes(room_id, {"usr_a": [1, 7], "usr_b": [2, 3]}) == (10, 10)
    assert await store.flush_likes(room_id, {"usr_a": [1, 5]}) == (15, 5)
    assert int(await layer.redis.get(keys.likes(room_id))) == 15


async def test_like_frames_spend_from_a_bucket_with_no_window_edge(layer: Layer) -> None:
    """A fixed one-second window let a user send its quota just before a second's end and again
    just after (34 frames in 0.21 s were seen against 20 a second): the GCRA bucket admits the
    burst, then only what the rate refilled, wherever the seconds fall."""
    store, room_id = layer.store, new_id("room")
    cap = protocol.MAX_LIKE_FRAMES_PER_S
    started = time.monotonic()
    _, accepted = await store.flush_likes(room_id, {"usr_a": [cap + 10, (cap + 10) * 2]})
    assert accepted == cap * 2  # the burst, two taps a frame
    _, again = await store.flush_likes(room_id, {"usr_a": [cap, cap]})
    elapsed = time.monotonic() - started
    assert again <= cap * elapsed + 1, (again, elapsed)
    _, other = await store.flush_likes(room_id, {"usr_b": [cap, cap]})
    assert other == cap  # one user's bucket is theirs alone


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


class Channel:
    """A room's channel as another process sees it: every message published on it, raw."""

    def __init__(self, layer: Layer, room_id: str) -> None:
        self.pubsub = layer.redis.pubsub()
        self.sharded = layer.broker.sharded
        self.name = keys.channel(room_id)

    async def __aenter__(self) -> "Channel":
        await (self.pubsub.ssubscribe(self.name) if self.sharded else self.pubsub.subscribe(self.name))
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.pubsub.aclose()  # type: ignore[no-untyped-call]

    async def messages(self, settle_s: float = 0.3) -> list[bytes]:
        """What came, until nothing more has for `settle_s`."""
        got: list[bytes] = []
        loop = asyncio.get_running_loop()
        quiet_until = loop.time() + settle_s
        while (left := quiet_until - loop.time()) > 0:
            msg = await self.pubsub.get_message(timeout=left)
            if msg is not None and msg["type"] in ("message", "smessage"):
                got.append(msg["data"])
                quiet_until = loop.time() + settle_s
        return got


async def test_the_likes_event_the_flush_script_builds_is_the_protocols(layer: Layer) -> None:
    """likes_flush.lua writes the `likes` event's JSON itself (the total is only known there): it is
    exactly what protocol.Likes encodes to, for the audience of everyone."""
    room_id = new_id("room")
    async with Channel(layer, room_id) as channel:
        assert await layer.store.flush_likes(room_id, {"usr_a": [2, 9]}) == (9, 9)
        (message,) = await channel.messages()
    assert message[:1] == protocol.EVERYONE
    event = msgspec.json.decode(message[1:], type=protocol.Likes)
    assert event == protocol.Likes(total=9, delta=9) and protocol.encode(event) == message[1:]


async def test_a_refused_chat_message_spends_the_rate_limit_and_tells_the_host_once(layer: Layer) -> None:
    """A banned word or a mute refuses a message after its rate limit has spent from it (banned
    words sent fast are still refused as too fast), and the host hears of it once, a retried call
    included; the room hears nothing."""
    store, room_id = layer.store, new_id("room")
    store._post = RunTwice(store._post)  # type: ignore[method-assign]
    limit = Limit(f"chat-{secrets.token_hex(3)}", per_second=0.001, burst=2)
    user = protocol.UserRef(id="usr_a", name="a")

    async def post(text: str, banned: bool) -> tuple[str, int]:
        event = protocol.Chat(id=new_id("msg"), user=user, text=text, ts=1)
        rejected = protocol.ChatRejected(user=user, text=text, reason="banned_word" if banned else "muted", ts=1)
        return await store.post_chat(room_id, event.id, user.id, protocol.encode(event),
                                     rejected=protocol.encode(rejected), banned=banned, limit=limit)

    async with Channel(layer, room_id) as channel:
        assert await post("a banned word", banned=True) == ("banned_word", 0)
        await store.mute(room_id, user.id, 60_000)
        status, until = await post("while muted", banned=False)
        assert status == "muted" and until > 0
        status, wait = await post("one too many", banned=True)
        assert status == "rate_limited" and wait > 0
        messages = await channel.messages()
    assert [m[:1] for m in messages] == [protocol.HOST, protocol.HOST]
    reasons = [msgspec.json.decode(m[1:], type=protocol.ChatRejected).reason for m in messages]
    assert reasons == ["banned_word", "muted"]
    assert await layer.redis.llen(keys.history(room_id)) == 0


async def test_the_chat_rate_limit_holds_per_room(layer: Layer) -> None:
    """Each room has its own bucket per user (the script touches the room's slot only)."""
    limit = Limit(f"chat-{secrets.token_hex(3)}", per_second=0.001, burst=1)
    first, second = new_id("room"), new_id("room")

    async def post(room_id: str) -> str:
        event = protocol.Chat(id=new_id("msg"), user=protocol.UserRef(id="usr_b", name="b"), text="hi", ts=1)
        status, _ = await layer.store.post_chat(room_id, event.id, "usr_b", protocol.encode(event), rejected=b"{}",
                                                banned=False, limit=limit)
        return status

    assert [await post(first), await post(first), await post(second)] == ["posted", "rate_limited", "posted"]


class Heard:
    """A broker listener that keeps what it receives and counts resyncs (each one a reconnect)."""

    def __init__(self) -> None:
        self.messages: dict[str, list[bytes]] = {}
        self.resyncs = 0

    def on_message(self, room_id: str, data: bytes) -> None:
        self.messages.setdefault(room_id, []).append(data)

    async def resync(self) -> None:
        self.resyncs += 1

    def end_sessions(self, session_ids: Collection[str]) -> None:
        pass


async def test_on_a_cluster_many_rooms_joined_at_once_are_subscribed_on_their_nodes(cluster_url: str) -> None:
    """40 rooms joined in one turn: their channels are in 40 slots over 3 masters, so each link
    subscribes to channels of many slots at once (a cluster refuses an SSUBSCRIBE naming
    several: CROSSSLOT). Every room is subscribed, a message to each arrives, and the links
    never had to reconnect."""
    async with open_redis(cluster_url, 8) as redis:
        publisher = await Publisher.detect(redis)
        broker = Broker(Nodes(redis), Sessions("broker-test-secret-" + "c" * 32, 3600, redis), sharded=True)
        heard = Heard()
        task = asyncio.create_task(broker.run(heard))
        try:
            rooms = [new_id("room") for _ in range(40)]
            nodes = Nodes(redis)
            await nodes.learn()
            assert len({nodes.of(keys.channel(r)) for r in rooms}) == 3
            await asyncio.wait_for(asyncio.gather(*(broker.subscribe(r) for r in rooms)), 10)
            for r in rooms:
                await publisher.publish(r, protocol.EVERYONE + b'{"type":"ping"}')

            async def all_heard() -> bool:
                return all(heard.messages.get(r) for r in rooms)
            await eventually(all_heard, timeout=10, what="a message in every room")
            assert heard.resyncs == 0 and broker.is_connected()
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
