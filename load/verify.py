"""The correctness verdict of a spike, from what buyers were told and what the API says afterwards.

Sources: every purchase answer the buyers got (order ids per Idempotency-Key),
the sale's figures (GET /api/sales/{id}, live from Redis) and each buyer's
persisted orders (GET /api/orders, from SQL, once the persister caught up).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from load.buyers import FINAL
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
        v.orders[a.order_id] = a.answered_qty or a.quantity
        v.keys.setdefault(a.key, set()).add(a.order_id)
        if a.outcome == "reserved":
            v.created[a.key] = v.created.get(a.key, 0) + 1
    return views


def unanswered(views: list[BuyerView]) -> dict[tuple[int, str], int]:
    """(buyer, key) -> units asked, for the keys that may hold an order nobody was told about: a
    try of theirs may have run the script, and no try or click of the same key got its order."""
    return {(i, key): q for i, v in enumerate(views) for key, q in v.record.unknown_keys.items()
            if key not in v.keys}


def demand(views: list[BuyerView], limit: int, greedy_tries: int, hammer_burst: int = 15) -> int:
    """Units the buyers would take if stock were endless (each at most the limit)."""
    want = {"normal": 1, "early": 1, "double_click": 1, "bulk": limit, "greedy": min(limit, greedy_tries),
            "hammer": min(limit, hammer_burst)}
    return sum(want.get(v.record.style, 1) for v in views)


async def persisted(pool: Pool, views: list[BuyerView], sale_id: str, wait_s: float, sold: int, paid: int
                    ) -> tuple[dict[int, dict[str, dict[str, Any]]], float, bool]:
    """Each interesting buyer's orders in SQL for this sale, polled until every answered order is there
    and SQL's totals match Redis's (orders of unanswered keys and payments whose answer was lost come
    too; the persister runs moments behind), or `wait_s` passes. Returns the orders, the wait, and
    whether it caught up."""
    todo = [i for i, v in enumerate(views) if v.orders or v.record.unknown_keys or v.record.unknown_pays]
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
                  limit: int, greedy_tries: int, persist_wait_s: float, observed_remaining: list[int] | None = None,
                  hammer_burst: int = 15) -> tuple[list[Check], dict[str, Any]]:
    """The checks, and the figures they rest on. `observed_remaining`: every `remaining` seen on the way
    (sale events, polls); none may be negative."""
    stock, sold = int(sale["stock"]), int(sale["sold"])
    remaining, reserved, paid = int(sale["remaining"]), int(sale["reserved"]), int(sale["paid"])
    views = fold(records, attempts)
    found, waited, caught_up = await persisted(pool, views, sale["id"], persist_wait_s, sold, paid)
    checks: list[Check] = []
    acked_units = sum(v.units for v in views)
    unknown = unanswered(views)
    unknown_keys, unknown_units = len(unknown), sum(unknown.values())
    unknown_by_buyer = Counter(i for i, _ in unknown)
    wanted = demand(views, limit, greedy_tries, hammer_burst)
    lowest = min(observed_remaining or [remaining])
    purchases = [a for a in attempts if a.kind == "purchase"]
    crashed = [(v.record.user_id, v.record.crashed) for v in views if v.record.crashed]
    checks.append(Check("buyers_completed", not crashed,
                        "every buyer read every answer it got" if not crashed
                        else f"{len(crashed)} buyers stopped on an answer they could not read: {crashed[:3]}"))

    checks.append(Check("no_oversell", sold <= stock and remaining >= 0 and remaining + reserved + paid == stock
                        and acked_units <= stock and lowest >= 0,
                        f"stock {stock}, sold {sold} (reserved {reserved} + paid {paid}), remaining {remaining}, "
                        f"units in the orders buyers were told of {acked_units}, lowest remaining seen on the way {lowest}"))
    # Nothing is released during a run (orders are held for longer than it lasts), so the stock only
    # goes down and each buyer's holdings only up: a refusal must still hold at the end, and no
    # reservation sent after it came back may contradict it. The sale is on until the buyers are done.
    sql_by_buyer = {i: sum(o["quantity"] for o in rows.values()) for i, rows in found.items()}
    held = {i: max(v.units, sql_by_buyer.get(i, 0)) for i, v in enumerate(views)}
    told_out = [a for a in purchases if a.outcome == "sold_out"]
    too_big = [a for a in purchases if a.outcome == "not_enough" and a.quantity <= remaining]
    over_limit = [a for a in purchases if a.outcome == "limit_exceeded" and held[a.buyer] + a.quantity <= limit]
    ended = [a for a in purchases if a.outcome == "ended"]
    # Answers a correct server never gives these requests (a 4xx that is no refusal, a key reused).
    impossible = [a for a in purchases if 400 <= a.status < 500 and a.status != 429
                  and a.outcome not in FINAL | {"not_started"}]
    reserved_at = sorted((a.at_ms, a.answered_qty or a.quantity) for a in purchases if a.outcome == "reserved")
    margin_ms = 100.0  # clocks of several generator processes agree to a few ms
    late = [a for a in purchases if a.outcome in ("sold_out", "not_enough")
            and remaining + sum(q for t, q in reserved_at if t > a.at_ms + a.latency_ms + margin_ms)
            >= (1 if a.outcome == "sold_out" else a.quantity)]
    wrong_refusals = (len(told_out) if remaining > 0 else 0) + len(too_big) + len(over_limit) + len(ended) \
        + len(impossible) + len(late)
    checks.append(Check("refusals_justified", wrong_refusals == 0,
                        f"sold_out answers {len(told_out)} (remaining at the end {remaining}); refused wrongly: "
                        f"not_enough for no more than remained {len(too_big)}, limit_exceeded below the limit "
                        f"{len(over_limit)}, ended during the run {len(ended)}, stock refusals that reservations "
                        f"sent after them belie {len(late)}, answers no request of ours should get {len(impossible)}"
                        + (f" e.g. {[(a.outcome, a.status) for a in impossible[:3]]}" if impossible else "")))
    last: dict[int, str] = {}
    for a in sorted(purchases, key=lambda a: a.at_ms):
        last[a.buyer] = a.outcome
    refused = ("sold_out", "not_enough", "limit_exceeded")
    unserved = sum(1 for i in range(len(views)) if not held[i] and last.get(i) not in refused)
    if wanted >= stock:
        # Sold out; or the rest is less than anyone still asked for, and no buyer gave up unserved.
        rest_too_small = remaining > 0 and unserved == 0 and any(a.outcome == "not_enough" for a in purchases)
        checks.append(Check("sold_equals_stock", sold == stock or rest_too_small,
                            f"demand {wanted} >= stock {stock}: sold {sold}"
                            + ("" if sold == stock else f"; buyers left with nothing and no refusal {unserved}")))
    else:
        # Stock never ran short, so nobody may have been told it did, and nobody got more than asked.
        short = sum(1 for a in purchases if a.outcome in ("sold_out", "not_enough"))
        checks.append(Check("sold_equals_demand", short == 0 and sold <= wanted,
                            f"demand {wanted} < stock {stock}: sold {sold}, answered {acked_units}, "
                            f"answers saying stock ran short {short}, buyers left with nothing {unserved}"))
    asked = {(a.buyer, a.order_id): a.quantity for a in purchases if a.order_id}
    other_qty = [o for (i, o), q in asked.items() if views[i].orders.get(o) != q]
    checks.append(Check("orders_as_asked", not other_qty,
                        "every order answered with the quantity asked" if not other_qty
                        else f"{len(other_qty)} orders answered with another quantity: {other_qty[:3]}"))

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
    checks.append(Check("answers_match_sold", acked_units <= sold <= acked_units + unknown_units,
                        f"units in the orders buyers were told of {acked_units}, sold {sold}, purchases never answered {unknown_keys} "
                        f"({unknown_units} units)"))
    told_paid = sum(v.orders.get(o, 0) for v in views for o in set(v.record.paid))
    maybe_paid = sum(v.orders.get(o, 0) for v in views for o in set(v.record.unknown_pays))
    # The bundled provider approves every payment, and every order is payable until after the run.
    refused_pays = [a for a in attempts if a.kind == "pay" and 400 <= a.status < 500 and a.status != 429]
    checks.append(Check("payments_match", told_paid <= paid <= told_paid + maybe_paid and not refused_pays,
                        f"units answered 'paid' {told_paid}, Redis paid {paid}, pays left unanswered "
                        f"{len([1 for v in views for _ in v.record.unknown_pays])}, payments refused {len(refused_pays)}"
                        + (f" e.g. {[a.outcome for a in refused_pays[:3]]}" if refused_pays else "")))

    sql_units = sum(sql_by_buyer.values())
    sql_paid = sum(o["quantity"] for rows in found.values() for o in rows.values() if o["status"] == "paid")
    sql_reserved = sum(o["quantity"] for rows in found.values() for o in rows.values() if o["status"] == "reserved")
    missing = [(views[i].record.user_id, o) for i in found for o in views[i].orders if o not in found[i]]
    extra = [(views[i].record.user_id, o) for i in found for o in found[i] if o not in views[i].orders]
    unexplained = [i for i in found if len(set(found[i]) - set(views[i].orders)) > unknown_by_buyer.get(i, 0)]
    # Each answered order as the buyer was told: its quantity, and paid if and only if it was told
    # so (either, for a payment left unanswered); nothing released.
    wrong = []
    for i, rows in found.items():
        v = views[i]
        for order_id, row in rows.items():
            told = v.orders.get(order_id)
            may_be = ({"paid"} if order_id in v.record.paid else {"paid", "reserved"}
                      if order_id in v.record.unknown_pays else {"reserved"})
            if (told is not None and row["quantity"] != told) or row["status"] not in may_be:
                wrong.append((v.record.user_id, order_id, row["status"], row["quantity"]))
    ok = (caught_up and not missing and not unexplained and not wrong and sql_reserved == reserved
          and sql_paid == paid and sql_units == sold)
    checks.append(Check("redis_equals_sql", ok,
                        f"after {waited:.1f}s{'' if caught_up else ' (gave up waiting)'}: SQL units {sql_units} vs "
                        f"Redis sold {sold}, SQL reserved {sql_reserved} vs Redis {reserved}, SQL paid {sql_paid} vs "
                        f"Redis paid {paid}, answered orders missing in SQL {len(missing)}, orders in SQL not as "
                        f"answered {len(wrong)}, orders in SQL never answered {len(extra)} (allowed: unanswered keys)"
                        + (f"; missing e.g. {missing[:3]}" if missing else "")
                        + (f"; not as answered e.g. {wrong[:3]}" if wrong else "")))
    facts = {"stock": stock, "sold": sold, "remaining": remaining, "reserved": reserved, "paid": paid,
             "lowest_remaining_seen": lowest, "demand_units": wanted, "answered_units": acked_units,
             "answered_orders": sum(len(v.orders) for v in views), "unanswered_keys": unknown_keys,
             "unanswered_units": unknown_units, "buyers_unserved": unserved, "buyers_crashed": len(crashed),
             "paid_units_answered": told_paid, "sql_units": sql_units, "sql_paid_units": sql_paid,
             "persist_wait_s": round(waited, 2), "buyers_with_orders": sum(1 for v in views if v.orders)}
    return checks, facts
