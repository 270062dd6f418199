"""The broadcast bench: one room, thousands of viewers in client processes of their own, chatters
among them; deliveries per second, delivery latency, memory per idle viewer."""

from __future__ import annotations

import asyncio
import math
import secrets
import time
from typing import Any

from load.fleet import Fleet, split
from load.http import Pool
from load.machine import rss_kib
from load.messages import BuyerMix, BuyersDone, Go, Ready, Stop, ViewerResult, WorkerPlan, WorkerResult
from load.servers import Served
from load.setup import SetupError, create_scene, end_room
from load.stats import Histogram
from load.viewers import RoomContext, Viewer

VIEWERS_PER_CLIENT_PROC = 2500
CHATS_PER_CHATTER_S = 1.0     # under the server's 2/s per-user limit


async def _warm_up(url: str, room_id: str, n: int = 20) -> None:
    """A few connections first: the server's first WebSocket allocates once (imports, caches)."""
    ctx = RoomContext(url, room_id, "warm", result=ViewerResult())
    viewers = [Viewer(ctx, f"warm{i}", None) for i in range(n)]
    await asyncio.gather(*(v.connect() for v in viewers))
    await asyncio.gather(*(v.close() for v in viewers))


async def broadcast_run(srv: Served, n: int, *, seconds: float, procs: int, chat_rate: float) -> dict[str, Any]:
    """`n` viewers in one room, chatters among them sending `chat_rate` messages a second in all for
    `seconds`: deliveries, their latency, memory per idle viewer and the CPU shares."""
    pool = Pool(srv.url, size=8)
    scene = await create_scene(pool, title=f"bench broadcast {n}")
    procs = max(procs, math.ceil(n / VIEWERS_PER_CLIENT_PROC))
    chatters = max(1, math.ceil(chat_rate / CHATS_PER_CHATTER_S))
    interval = chatters / chat_rate if chat_rate > 0 else 0.0
    run_id = secrets.token_hex(3)
    chatters = min(chatters, n)
    # The chatters get a process of their own: in one that also receives thousands of viewers' frames,
    # a burst of deliveries would hold up their sends and lower the offered rate.
    sizes = [(chatters, chatters)] + [(v, 0) for v in split(n - chatters, procs) if v]
    plans = [WorkerPlan(index=i, url=srv.url, room_id=scene.room_id, run_id=run_id, viewers=v, chatters=c,
                        chat_interval_s=interval, like_interval_s=0.0, buyers=0, mix=BuyerMix(),
                        deadline_s=seconds + 240, connect_concurrency=64, observer=False)
             for i, (v, c) in enumerate(sizes)]
    await _warm_up(srv.url, scene.room_id)
    await asyncio.sleep(1.0)
    engine = srv.engine_pid()
    rss_before, engine_before = srv.rss_kib(), rss_kib(engine) if engine else 0
    fleet = Fleet(time.monotonic() + seconds + 300)
    try:
        fleet.spawn(plans)
        ready = await fleet.collect(Ready, 240)
        connected = sum(r.viewers_open for r in ready.values())
        await asyncio.sleep(2.0)  # let allocations settle before reading RSS
        rss_after, engine_after = srv.rss_kib(), rss_kib(engine) if engine else 0
        fleet.phase = "chat"
        cpu0, engine_cpu0, _ = srv.cpu_s()
        fleet.broadcast(Go("sale_none", 0, 1))
        t0, t0_wall_ms = time.monotonic(), time.time() * 1000
        await fleet.collect(BuyersDone, 30)
        await asyncio.sleep(max(0.0, seconds - (time.monotonic() - t0)))
        fleet.broadcast(Stop())
        chat_s = time.monotonic() - t0
        cpu1, engine_cpu1, _ = srv.cpu_s()
        results = await fleet.collect(WorkerResult, 120)
    finally:
        fleet.broadcast(Stop())
        await fleet.reap()
        try:
            await end_room(pool, scene)
        except (SetupError, OSError):
            pass
        await pool.close()
    hist, send_ms = Histogram(), Histogram()
    receipts = skipped = 0
    errors: dict[str, int] = {}
    drops: dict[str, int] = {}
    events = 0
    sent = sum(len(r.sent_nonces) for r in results.values())
    for r in results.values():
        hist.merge(r.viewers.danmaku)
        send_ms.merge(r.viewers.chat_send_ms)
        skipped += r.viewers.chats_skipped
        for name, k in r.viewers.server_errors.items():
            errors[name] = errors.get(name, 0) + k
        receipts += sum(r.viewers.receipts.values())
        events += sum(r.viewers.events)
        for code, k in r.viewers.drops.items():
            drops[str(code)] = drops.get(str(code), 0) + k
    expected = sent * max(0, connected - 1)
    # Over the time the deliveries took (they may run on past the sending when the server is behind).
    last = max((r.viewers.last_receipt_ms for r in results.values()), default=t0_wall_ms)
    span_s = max(chat_s, (last - t0_wall_ms) / 1000)
    return {
        "viewers": n, "connected": connected, "client_procs": len(plans), "chatters": chatters,
        "chat_rate_per_s": chat_rate, "seconds": round(chat_s, 2), "messages_sent": sent,
        "sends_skipped": skipped, "send_ms": send_ms.summary(), "error_events": errors,
        "deliveries": receipts, "delivery_span_s": round(span_s, 2),
        "deliveries_per_s": round(receipts / span_s, 1) if span_s else 0.0,
        "delivery_ratio": round(receipts / expected, 4) if expected else None,
        "events_per_s": round(events / span_s, 1) if span_s else 0.0,
        "delivery_ms": hist.summary(), "dropped": drops,
        "server_rss_kib": {"before": rss_before, "after_connect": rss_after},
        "memory_per_idle_viewer_kib": round((rss_after - rss_before) / connected, 2) if connected else None,
        "engine_rss_kib": {"before": engine_before, "after_connect": engine_after},
        # CPU shares during the chat (1.0 = one core): which side ran out first.
        "server_cpu_share": round((cpu1 - cpu0) / chat_s, 2) if chat_s else None,
        # All of it: posting each message (its checks and Redis step) and delivering it to the room.
        "server_cpu_us_per_message": round((cpu1 - cpu0) / sent * 1e6) if sent else None,
        "engine_cpu_share": round((engine_cpu1 - engine_cpu0) / chat_s, 2) if chat_s else None,
        "client_cpu_share": [round(r.live_cpu_s / r.live_s, 2) if r.live_s else None for r in results.values()],
    }
