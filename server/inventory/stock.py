"""A sale's stock and orders in Redis: the atomic scripts and the reads around them.

Invariant, at every moment: remaining + reserved + paid == stock, remaining >= 0.
Each state change is one Lua script (reserve, pay, release, end) that checks
everything before its first write and appends the change to the sale's stream.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import msgspec
from redis.exceptions import ResponseError

from server.backends.autopipeline import AutoPipeline
from server.backends.lua import NOW_MS, load_script
from server.backends.redis_client import RedisClient, text
from server.errors import Unavailable
from server.ids import random_b32
from server.inventory import keys
from server.inventory.records import (
    Change,
    OrderRecord,
    PayStatus,
    ReleaseStatus,
    Reservation,
    ReserveStatus,
    SaleInfo,
    SaleState,
    Terms,
)
from server.ratelimit import GCRA, Limit

CAPTURE_AFTER_MS = 30_000

_ORDER_ID = re.compile(r"^ord_([a-z2-7]{26})[a-z2-7]{16}$")
_order = msgspec.json.Decoder(OrderRecord)
_info = msgspec.json.Decoder(SaleInfo)


def new_order_id(sale_id: str) -> str:
    """Order ids carry their sale's id (so paying needs no lookup); clients treat them as opaque."""
    return f"ord_{sale_id.removeprefix('sale_')}{random_b32(10)}"


def sale_of(order_id: str) -> str | None:
    m = _ORDER_ID.match(order_id)
    return f"sale_{m.group(1)}" if m else None


def decode_order(raw: bytes | str) -> OrderRecord:
    return _order.decode(raw)


@dataclass(frozen=True)
class Books:
    """One instant of a sale's bookkeeping in Redis (Stock.books)."""
    state: SaleState | None
    captures_owed: int
    group: dict[str, Any] | None  # this deployment's persister group; None while the sale has no stream
    orders: dict[str, OrderRecord]  # only when asked for


def _order_or_none(raw: bytes) -> OrderRecord | None:
    return _order.decode(raw) if raw else None


def parse_state(raw: Mapping[bytes | str, bytes | str]) -> SaleState | None:
    """The sale hash, typed; None if there is no such sale (no hash, or the mark archive_sale.lua
    leaves for a sale that was never created)."""
    fields: dict[str, Any] = {text(k): text(v) for k, v in raw.items()}
    if "room_id" not in fields:
        return None
    fields["info"] = _info.decode(fields["info"])
    return msgspec.convert(fields, SaleState, strict=False)  # the numbers come as text


def parse_orders(raw: Mapping[bytes | str, bytes | str]) -> dict[str, OrderRecord]:
    return {text(k): _order.decode(v) for k, v in raw.items()}


WAKES_KEPT = 10_000  # entries of the wake stream; a jobs process further behind polls instead


class Stock:
    def __init__(self, redis: RedisClient, deployment: str, *, replica_acks: int = 0) -> None:
        self.redis = redis
        # One deployment = one SQL database. Its open-sales set and its persister group are its
        # own, so deployments sharing a Redis never take each other's orders.
        self.open_key = keys.open_sales(deployment)
        self.wakes_key = keys.wakes(deployment)
        self.group = f"persister:{deployment}"
        self._reserve = load_script(redis, "server.inventory", "reserve.lua", NOW_MS, GCRA)
        self._pay = load_script(redis, "server.inventory", "pay.lua", NOW_MS)
        self._release = load_script(redis, "server.inventory", "release.lua", NOW_MS)
        self._end = load_script(redis, "server.inventory", "end_sale.lua", NOW_MS)
        self._mark_started = load_script(redis, "server.inventory", "mark_started.lua")
        self._create = load_script(redis, "server.inventory", "create_sale.lua")
        self._archive = load_script(redis, "server.inventory", "archive_sale.lua")
        self._batched = AutoPipeline(redis, replica_acks=replica_acks)  # every state change goes through it
        self._rooms: dict[str, str] = {}  # sale -> room: never changes
        # How long a paying request has to capture before the late captures do it in its place.
        self.capture_after_ms = CAPTURE_AFTER_MS

    def disconnect(self) -> None:
        """Close the scripts' own connection (the Redis client's pool is the caller's to close)."""
        self._batched.close()

    async def create(self, t: Terms) -> None:
        """Index the sale, then create it: two slots, so two steps, in the order that is safe if
        the process dies between them. An indexed sale that never gets created is archived by the
        jobs (archive_sale.lua), which also keeps it from being created late; a sale created but
        never indexed would sell with nobody persisting its orders."""
        await self.redis.sadd(self.open_key, t.sale_id)
        fields: dict[str, Any] = {
            "room_id": t.room_id, "stock": t.stock, "remaining": t.stock, "reserved": 0, "paid": 0,
            "limit": t.per_user_limit, "price": t.price_cents, "starts_at": t.starts_at_ms,
            "ends_at": t.ends_at_ms, "ended_at": 0, "timeout_ms": t.payment_timeout_ms, "v": 1,
            "info": msgspec.json.encode(t.info),
            # mark_started.lua announces once, by HSETNX: the field is written only when set.
            **({"started_announced": 1} if t.started else {}),
        }
        created = await self._batched.script(self._create, [keys.sale(t.sale_id)], [x for kv in fields.items() for x in kv])
        if not created:  # the jobs archived it in the moment between the two steps: launch again
            raise Unavailable("the sale could not be created, try again")
        await self.ensure_group(t.sale_id)
        await self.wake([t.sale_id])

    def persister_group(self, groups: list[dict[str, Any]]) -> dict[str, Any] | None:
        """This deployment's persister group among a sale stream's XINFO GROUPS, if there."""
        return next((g for g in groups if g["name"] in (self.group, self.group.encode())), None)

    async def books(self, sale_id: str, *, orders: bool = False) -> Books:
        """The sale's hash, its captures owed, this deployment's persister group and, if asked,
        its orders, read in one transaction: separate reads could straddle a change (a payment
        landing between them; a batch persisted between them)."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hgetall(keys.sale(sale_id))
            pipe.zcard(keys.captures(sale_id))
            pipe.xinfo_groups(keys.log(sale_id))
            if orders:
                pipe.hgetall(keys.orders(sale_id))
            replies = await pipe.execute(raise_on_error=False)
        raw_state, owed, groups, *raw_orders = replies
        for reply in (raw_state, owed, *raw_orders):
            if isinstance(reply, Exception):
                raise reply
        return Books(state=parse_state(raw_state), captures_owed=int(owed),
                     group=None if isinstance(groups, ResponseError) else self.persister_group(groups),
                     orders=parse_orders(raw_orders[0]) if raw_orders else {})

    async def unpersisted_age_ms(self, sale_id: str, group: Mapping[str, Any]) -> int:
        """How long ago (by Redis's clock) the oldest stream entry this deployment's persister has
        not written was added: the oldest pending one, or the first one never read. 0 if none."""
        log = keys.log(sale_id)
        pending = await self.redis.xpending(log, self.group)
        oldest = [text(pending["min"])] if pending["pending"] else []
        unread = await self.redis.xrange(log, min="(" + text(group["last-delivered-id"]), count=1)
        oldest += [text(entry_id) for entry_id, _ in unread or () if entry_id is not None]
        if not oldest:
            return 0
        seconds, micros = await self.redis.time()
        return max(0, seconds * 1000 + micros // 1000 - min(int(i.split("-")[0]) for i in oldest))

    async def ensure_group(self, sale_id: str) -> None:
        try:
            await self.redis.xgroup_create(keys.log(sale_id), self.group, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def reserve(self, sale_id: str, user_id: str, idem_key: str, order_id: str, quantity: int,
                      ref: str | None, limits: Sequence[tuple[Limit, str]] = ()) -> Reservation:
        """Reserve units, after spending one attempt from each (limit, subject) rate-limit bucket.
        The buckets are the sale's own, so the script touches one slot."""
        script_keys = [keys.sale(sale_id), keys.buyers(sale_id), keys.idempotency(sale_id), keys.orders(sale_id),
                       keys.expiry(sale_id), keys.log(sale_id)]
        args: list[Any] = [user_id, idem_key, order_id, quantity, ref or ""]
        for limit, subject in limits:
            script_keys.append(keys.limit(sale_id, limit.name, subject))
            args += [limit.interval_ms, limit.burst]
        status, order, remaining, *more = await self._batched.script(self._reserve, script_keys, args)
        return Reservation(cast(ReserveStatus, text(status)), _order_or_none(order), int(remaining),
                           *(int(x) for x in more))

    async def pay(self, sale_id: str, order_id: str, user_id: str, payment_ref: str) -> Change:
        status, order = await self._batched.script(self._pay,
            [keys.sale(sale_id), keys.orders(sale_id), keys.expiry(sale_id), keys.log(sale_id), keys.captures(sale_id)],
            [order_id, user_id, payment_ref, self.capture_after_ms])
        return Change(cast(PayStatus, text(status)), _order_or_none(order))

    async def captured(self, sale_id: str, order_id: str) -> None:
        """The order's payment is captured: no capture is due for it any more."""
        await self.redis.zrem(keys.captures(sale_id), order_id)

    async def capture_owed(self, sale_id: str, order_id: str) -> bool:
        return await self.redis.zscore(keys.captures(sale_id), order_id) is not None

    async def capture_later(self, sale_id: str, order_id: str, due_ms: int) -> None:
        """Move a capture that failed to a later time, unless it was captured meanwhile."""
        await self.redis.zadd(keys.captures(sale_id), {order_id: due_ms}, xx=True)

    async def captures_due(self, sale_id: str, now_ms: int, limit: int = 100) -> list[str]:
        """Paid orders whose paying request has not reported its capture in time."""
        return await self._due(keys.captures(sale_id), now_ms, limit)

    async def release(self, sale_id: str, order_id: str, reason: str, user_id: str = "") -> Change:
        status, order, remaining = await self._batched.script(self._release,
            [keys.sale(sale_id), keys.buyers(sale_id), keys.orders(sale_id), keys.expiry(sale_id), keys.log(sale_id)],
            [order_id, reason, user_id])
        return Change(cast(ReleaseStatus, text(status)), _order_or_none(order), int(remaining))

    async def end(self, sale_id: str, reason: str) -> bool:
        ended = bool(await self._batched.script(self._end, [keys.sale(sale_id), keys.log(sale_id)], [reason]))
        if ended:
            await self.wake([sale_id])
        return ended

    async def wake(self, sale_ids: Iterable[str]) -> None:
        """Tell the jobs processes these sales changed (server/inventory/watch.py). Best effort:
        a wake that is lost costs a delay of at most watch.IDLE_S, never a change."""
        ids = ",".join(sale_ids)
        if ids:
            await self.redis.xadd(self.wakes_key, {"sales": ids}, maxlen=WAKES_KEPT, approximate=True)

    async def state(self, sale_id: str) -> SaleState | None:
        return parse_state(await self.redis.hgetall(keys.sale(sale_id)))

    async def room_of(self, sale_id: str) -> str | None:
        """The sale's room (remembered: it never changes); None if there is no such sale."""
        room_id = self._rooms.get(sale_id)
        if room_id is None:
            raw = await self.redis.hget(keys.sale(sale_id), "room_id")
            if raw is None:
                return None
            room_id = self._rooms[sale_id] = text(raw)
        return room_id

    async def figures(self, sale_id: str) -> tuple[int, int, int] | None:
        """(remaining, sold, v): what a `sale_update` tells; None if there is no such sale."""
        remaining, reserved, paid, v = await self.redis.hmget(keys.sale(sale_id), ["remaining", "reserved", "paid", "v"])
        if remaining is None or reserved is None or paid is None or v is None:
            return None
        return int(remaining), int(reserved) + int(paid), int(v)

    async def order(self, sale_id: str, order_id: str) -> OrderRecord | None:
        raw = await self.redis.hget(keys.orders(sale_id), order_id)
        return _order.decode(raw) if raw else None

    async def orders(self, sale_id: str) -> dict[str, OrderRecord]:
        return parse_orders(await self.redis.hgetall(keys.orders(sale_id)))

    async def due(self, sale_id: str, now_ms: int, limit: int = 500) -> list[str]:
        """Reserved orders past their pay-by time."""
        return await self._due(keys.expiry(sale_id), now_ms, limit)

    async def first_due(self, sale_id: str) -> int | None:
        """The earliest pay-by time of the reserved orders (ms), if any."""
        return await self._first(keys.expiry(sale_id))

    async def first_capture(self, sale_id: str) -> int | None:
        """When the earliest capture owed is due (ms), if any."""
        return await self._first(keys.captures(sale_id))

    async def _first(self, zset: str) -> int | None:
        first = await self.redis.zrange(zset, 0, 0, withscores=True)
        return int(first[0][1]) if first else None

    async def _due(self, zset: str, now_ms: int, limit: int) -> list[str]:
        ids = await self.redis.zrangebyscore(zset, "-inf", now_ms, start=0, num=limit)
        return [text(i) for i in ids]  # type: ignore[arg-type]  # without scores: members

    async def open_sales(self) -> list[str]:
        return sorted(text(s) for s in await self.redis.smembers(self.open_key))

    async def archive(self, sale_id: str) -> None:
        """A sale whose every change is settled and persisted: free what only served its selling
        (archive_sale.lua), then stop watching it. Two slots, two steps: if the process dies
        between them the sale stays watched, is found settled again and archived again."""
        await self._archive(keys=keys.all_keys(sale_id), args=[int(time.time() * 1000)])
        await self.redis.srem(self.open_key, sale_id)

    async def mark_started(self, sale_id: str) -> int:
        """For the one caller (of all processes) that gets to announce the start, the sale's new
        version; 0 for the others."""
        return int(await self._mark_started(keys=[keys.sale(sale_id)]))
