"""The correctness verdict of a spike, from what buyers were told and what the API says afterwards.

Sources: every purchase answer the buyers got (order ids per Idempotency-Key),
the sale's figures (GET /api/sales/{id}, live from Redis) and each buyer's
persisted orders (GET /api/orders, from SQL, once the persister caught up).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

from load.http import Pool
from load.messages import Attempt, BuyerRecord
from load.setup import orders_of


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


@dataclass
class BuyerView:
    """One buyer's answers, folded: orders it was told about, and keys left unanswered."""
    record: BuyerRecord
    orders: dict[str, int] = field(default_factory=dict)        # order id -> quantity
    keys: dict[str, set[str]] = field(default_factory=dict)     # key -> order ids answered for it
    created: dict[str, int] = field(default_factory=dict)       # key -> number of 201s

    @property
    def units(self) -> int:
        return sum(self.orders.values())


def fold(records: list[BuyerRecord], attempts: list[Attempt]) -> list[BuyerView]:
    views = [BuyerView(r) for r in records]
    for a in attempts:
        if a.kind != "purchase" or a.outcome not in ("reserved", "duplicate") or not a.order_id:
            continue
        v = views[a.buyer]
        v.orders[a.order_id] = a.quantity
        v.keys.setdefault(a.key, set()).add(a.order_id)
        if a.outcome == "reserved":
            v.created[a.key] = v.created.get(a.key, 0) + 1
    return views


def demand(views: list[BuyerView], limit: int, greedy_tries: int) -> int:
    """Units the buyers would take if stock were endless (each at most the limit)."""
    want = {"normal": 1, "early": 1, "double_click": 1, "bulk": limit, "greedy": min(limit, greedy_tries),
            "hammer": limit}
    return sum(want.get(v.record.style, 1) for v in views)


async def persisted(pool: Pool, views: list[BuyerView], sale_id: str, wait_s: float, sold: int, paid: int
                    ) -> tuple[dict[int, dict[str, dict[str, Any]]], float, bool]:
    """Each interesting buyer's orders in SQL for this sale, polled until every answered order is there
    and SQL's totals match Redis's (orders of unanswered keys and payments whose answer was lost come
    too; the persister runs moments behind), or `wait_s` passes. Returns the orders, the wait, and
    whether it caught up."""
    todo = [i for i, v in enumerate(views) if v.orders or v.record.unknown_keys]
    found: dict[int, dict[str, dict[str, Any]]] = {}
    gate = asyncio.Semaphore(pool.size)

    async def load(i: int) -> None:
        async with gate:
            rows = await orders_of(pool, views[i].record.token)
        found[i] = {o["order_id"]: o for o in rows if o["sale_id"] == sale_id}

    def complete(i: int) -> bool:
        rows = found.get(i, {})
        paid = set(views[i].record.paid)
        return set(views[i].orders) <= set(rows) and all(rows[o]["status"] == "paid" for o in paid if o in rows)

    def totals_match() -> bool:
        rows = [o for orders in found.values() for o in orders.values()]
        return bool(sum(o["quantity"] for o in rows) == sold
                    and sum(o["quantity"] for o in rows if o["status"] == "paid") == paid)

    t0 = time.monotonic()
    pending = todo
    while True:
        await asyncio.gather(*(load(i) for i in pending))
        pending = [i for i in pending if not complete(i)]
        if not pending and not totals_match():
            pending = [i for i in todo if views[i].record.unknown_keys or views[i].record.unknown_pays]
        if not pending or time.monotonic() - t0 > wait_s:
            return found, time.monotonic() - t0, not pending
        await asyncio.sleep(0.5)


async def verdict(pool: Pool, sale: dict[str, Any], records: list[BuyerRecord], attempts: list[Attempt],
                  limit: int, greedy_tries: int, persist_wait_s: float, observed_remaining: list[int] | None = None
                  ) -> tuple[list[Check], dict[str, Any]]:
    """The checks, and the figures they rest on. `observed_remaining`: every `remaining` seen on the way
    (sale events, polls); none may be negative."""
    stock, sold = int(sale["stock"]), int(sale["sold"])
    remaining, reserved, paid = int(sale["remaining"]), int(sale["reserved"]), int(sale["paid"])
    views = fold(records, attempts)
    found, waited, caught_up = await persisted(pool, views, sale["id"], persist_wait_s, sold, paid)
    checks: list[Check] = []
    acked_units = sum(v.units for v in views)
    unknown_keys = sum(v.record.unknown_keys for v in views)
    wanted = demand(views, limit, greedy_tries)
    lowest = min(observed_remaining or [remaining])

    checks.append(Check("no_oversell", sold <= stock and remaining >= 0 and remaining + reserved + paid == stock
                        and acked_units <= stock and lowest >= 0,
                        f"stock {stock}, sold {sold} (reserved {reserved} + paid {paid}), remaining {remaining}, "
                        f"units answered 201/200 {acked_units}, lowest remaining seen on the way {lowest}"))
    if wanted >= stock:
        checks.append(Check("sold_equals_stock", sold == stock, f"demand {wanted} >= stock {stock}: sold {sold}"))
    else:
        # Stock never ran short (nothing is released during a run), so nobody may have been told it did.
        short = sum(1 for a in attempts if a.kind == "purchase" and a.outcome in ("sold_out", "not_enough"))
        checks.append(Check("sold_equals_demand", short == 0,
                            f"demand {wanted} < stock {stock}: sold {sold}, answered {acked_units}, "
                            f"answers saying stock ran short {short}"))

    sql_by_buyer = {i: sum(o["quantity"] for o in rows.values()) for i, rows in found.items()}
    over = [(v.record.user_id, v.units) for v in views if v.units > limit]
    over += [(views[i].record.user_id, n) for i, n in sql_by_buyer.items() if n > limit]
    checks.append(Check("per_user_limit", not over,
                        f"no buyer over {limit} units, by the answers or in SQL" if not over
                        else f"{len(over)} over the limit: {over[:5]}"))

    twice = [(v.record.user_id, k, sorted(ids)) for v in views for k, ids in v.keys.items() if len(ids) > 1]
    twice += [(v.record.user_id, k, [f"201 x{n}"]) for v in views for k, n in v.created.items() if n > 1]
    owners: dict[str, int] = {}
    for v in views:
        for order_id in v.orders:
            owners[order_id] = owners.get(order_id, 0) + 1
    shared = [o for o, n in owners.items() if n > 1]
    checks.append(Check("no_duplicate_orders", not twice and not shared,
                        f"{sum(len(v.keys) for v in views)} answered keys, one order each"
                        if not twice and not shared else f"keys with several orders: {twice[:5]}; "
                                                          f"orders of several buyers: {shared[:5]}"))

    # Unanswered keys may have reserved (the answer was lost): sold may exceed what was answered by that much.
    unknown_room = unknown_keys * limit
    checks.append(Check("answers_match_sold", acked_units <= sold <= acked_units + unknown_room,
                        f"units answered {acked_units}, sold {sold}, unanswered keys {unknown_keys}"))
    told_paid = sum(v.orders.get(o, 0) for v in views for o in set(v.record.paid))
    maybe_paid = sum(v.orders.get(o, 0) for v in views for o in set(v.record.unknown_pays))
    checks.append(Check("payments_match", told_paid <= paid <= told_paid + maybe_paid,
                        f"units answered 'paid' {told_paid}, Redis paid {paid}, pays left unanswered "
                        f"{len([1 for v in views for _ in v.record.unknown_pays])}"))

    sql_units = sum(sql_by_buyer.values())
    sql_paid = sum(o["quantity"] for rows in found.values() for o in rows.values() if o["status"] == "paid")
    missing = [(views[i].record.user_id, o) for i in found for o in views[i].orders if o not in found[i]]
    extra = [(views[i].record.user_id, o) for i in found for o in found[i] if o not in views[i].orders]
    unexplained = [i for i in found if len(set(found[i]) - set(views[i].orders)) > views[i].record.unknown_keys]
    ok = caught_up and not missing and not unexplained and sql_units == sold and sql_paid == paid
    checks.append(Check("redis_equals_sql", ok,
                        f"after {waited:.1f}s{'' if caught_up else ' (gave up waiting)'}: SQL units {sql_units} vs "
                        f"Redis sold {sold}, SQL paid {sql_paid} vs Redis paid {paid}, answered orders missing in "
                        f"SQL {len(missing)}, orders in SQL never answered {len(extra)} (allowed: unanswered keys)"
                        + (f"; missing e.g. {missing[:3]}" if missing else "")))
    facts = {"stock": stock, "sold": sold, "remaining": remaining, "reserved": reserved, "paid": paid,
             "lowest_remaining_seen": lowest, "demand_units": wanted, "answered_units": acked_units,
             "answered_orders": sum(len(v.orders) for v in views), "unanswered_keys": unknown_keys,
             "paid_units_answered": told_paid, "sql_units": sql_units, "sql_paid_units": sql_paid,
             "persist_wait_s": round(waited, 2), "buyers_with_orders": sum(1 for v in views if v.orders)}
    return checks, facts
