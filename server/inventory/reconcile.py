"""Compare a sale in Redis (the source of truth for stock) with SQL.

Used by `livesale reconcile SALE_ID` and by the tests. Entries still in the
stream are reported as not yet persisted, not as differences.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from server.inventory import keys
from server.inventory.stock import Stock, parse_orders, parse_state
from server.inventory.tables import Order, Sale


@dataclass
class Report:
    sale_id: str
    stock: int = 0
    remaining: int = 0
    reserved: int = 0
    paid: int = 0
    redis_orders: int = 0
    sql_orders: int = 0
    unpersisted: int = 0
    captures_owed: int = 0  # paid orders whose payment is not captured yet (not a difference)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def lines(self) -> list[str]:
        head = (f"sale {self.sale_id}: stock {self.stock} = remaining {self.remaining} + reserved {self.reserved}"
                f" + paid {self.paid}; orders in Redis {self.redis_orders}, in SQL {self.sql_orders};"
                f" stream entries not yet persisted {self.unpersisted}; payment captures owed {self.captures_owed}")
        return [head] + [f"  DIFF {p}" for p in self.problems] + ([] if self.problems else ["  OK"])


async def reconcile(stock: Stock, db: async_sessionmaker[AsyncSession], sale_id: str) -> Report:
    report = Report(sale_id)
    # One atomic look at Redis first; SQL is read after, and compared only if nothing was in
    # flight then (a batch committed between two reads would look like a lost order).
    async with stock.redis.pipeline(transaction=True) as pipe:
        pipe.hgetall(keys.sale(sale_id))
        pipe.hgetall(keys.orders(sale_id))
        pipe.xinfo_groups(keys.log(sale_id))
        pipe.zcard(keys.captures(sale_id))
        raw_state, raw_orders, groups, owed = await pipe.execute(raise_on_error=False)
    state, orders = parse_state(raw_state), parse_orders(raw_orders)
    if isinstance(groups, Exception):  # no stream yet: nothing was ever logged
        groups = []
    if state is None:
        report.problems.append("sale not in Redis")
        return report
    report.captures_owed = int(owed)
    report.stock, report.remaining = state["stock"], state["remaining"]
    report.reserved, report.paid = state["reserved"], state["paid"]
    if report.remaining < 0:
        report.problems.append(f"remaining is negative: {report.remaining}")
    if report.remaining + report.reserved + report.paid != report.stock:
        report.problems.append("remaining + reserved + paid != stock")

    report.redis_orders = len(orders)
    by_status = {"reserved": 0, "paid": 0}
    per_buyer: dict[str, int] = {}
    for o in orders.values():
        if o["status"] in by_status:
            by_status[o["status"]] += o["quantity"]
            per_buyer[o["user_id"]] = per_buyer.get(o["user_id"], 0) + o["quantity"]
    if by_status["reserved"] != report.reserved or by_status["paid"] != report.paid:
        report.problems.append(f"counters disagree with the orders: orders hold {by_status}")
    for buyer, held in per_buyer.items():
        if held > state["limit"]:
            report.problems.append(f"buyer {buyer} holds {held} > limit {state['limit']}")

    group = stock.persister_group(groups)
    report.unpersisted = (group["pending"] + (group.get("lag") or 0)) if group else 0
    if report.unpersisted:
        return report  # SQL is behind; comparing order by order would only list what is in flight
    async with db() as session:
        if await session.get(Sale, sale_id) is None:
            report.problems.append("sale not in SQL")
        rows = {o.id: o for o in (await session.scalars(select(Order).where(Order.sale_id == sale_id))).all()}
    report.sql_orders = len(rows)
    for order_id, o in orders.items():
        row = rows.get(order_id)
        if row is None:
            report.problems.append(f"order {order_id} missing in SQL")
        elif (row.status, row.quantity, row.buyer_id, row.version) != (o["status"], o["quantity"], o["user_id"],
                                                                       o["v"]):
            report.problems.append(f"order {order_id}: Redis {o['status']} v{o['v']}, SQL {row.status} v{row.version}")
    for order_id in rows.keys() - orders.keys():
        report.problems.append(f"order {order_id} in SQL but not in Redis")
    return report
