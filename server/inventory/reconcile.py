"""Compare a sale in Redis (the source of truth for stock) with SQL.

Used by `livesale reconcile SALE_ID` and by the tests. Entries still in the
stream are reported as not yet persisted, not as differences, unless they have
waited so long that no persister is getting them into SQL.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from server.inventory.persister import CLAIM_IDLE_MS
from server.inventory.records import SaleState
from server.inventory.stock import Stock
from server.inventory.tables import Order, Sale

# Entries a persister read are claimed by another after CLAIM_IDLE_MS if it died; older than
# twice that, nobody is writing them (no jobs process, or one failing every batch: see its log).
STUCK_AFTER_MS = 2 * CLAIM_IDLE_MS


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
    archived: bool = False  # settled: its orders are in SQL only
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def lines(self) -> list[str]:
        head = (f"sale {self.sale_id}: stock {self.stock} = remaining {self.remaining} + reserved {self.reserved}"
                f" + paid {self.paid}; orders in Redis {self.redis_orders}, in SQL {self.sql_orders};"
                f" stream entries not yet persisted {self.unpersisted}; payment captures owed {self.captures_owed}"
                + ("; archived" if self.archived else ""))
        return [head] + [f"  DIFF {p}" for p in self.problems] + ([] if self.problems else ["  OK"])


async def reconcile(stock: Stock, db: async_sessionmaker[AsyncSession], sale_id: str, *,
                    stuck_after_ms: int = STUCK_AFTER_MS) -> Report:
    report = Report(sale_id)
    # One atomic look at Redis first; SQL is read after, and compared only if nothing was in
    # flight then (a batch committed between two reads would look like a lost order).
    books = await stock.books(sale_id, orders=True)
    state, orders = books.state, books.orders
    if state is None:
        report.problems.append("sale not in Redis")
        return report
    report.captures_owed = books.captures_owed
    report.stock, report.remaining = state.stock, state.remaining
    report.reserved, report.paid = state.reserved, state.paid
    if report.remaining < 0:
        report.problems.append(f"remaining is negative: {report.remaining}")
    if report.remaining + report.reserved + report.paid != report.stock:
        report.problems.append("remaining + reserved + paid != stock")
    if state.archived_at:
        await _reconcile_archived(report, db, state)
        return report

    report.redis_orders = len(orders)
    _check_holdings(report, state.limit, ((o.status, o.quantity, o.user_id) for o in orders.values()),
                    "counters disagree with the orders")

    group = books.group
    report.unpersisted = (group["pending"] + (group.get("lag") or 0)) if group else 0
    async with db() as session:
        if await session.get(Sale, sale_id) is None:  # a launch writes SQL first: never behind
            report.problems.append("sale not in SQL")
        rows: dict[str, Order] = {}
        if not report.unpersisted:
            rows = {o.id: o for o in (await session.scalars(select(Order).where(Order.sale_id == sale_id))).all()}
    if group and report.unpersisted:
        # SQL is behind; comparing order by order would only list what is in flight. Unless
        # nothing is bringing it forward.
        age_ms = await stock.unpersisted_age_ms(sale_id, group)
        if age_ms > stuck_after_ms:
            report.problems.append(f"stream entries waiting {age_ms // 1000} s to be persisted: the persister is "
                                   "stopped, failing or over a minute behind (is a jobs process running, and what "
                                   "does its log say?)")
        return report
    report.sql_orders = len(rows)
    for order_id, o in orders.items():
        row = rows.get(order_id)
        if row is None:
            report.problems.append(f"order {order_id} missing in SQL")
        elif (row.status, row.quantity, row.buyer_id, row.version) != (o.status, o.quantity, o.user_id, o.v):
            report.problems.append(f"order {order_id}: Redis {o.status} v{o.v}, SQL {row.status} v{row.version}")
    for order_id in rows.keys() - orders.keys():
        report.problems.append(f"order {order_id} in SQL but not in Redis")
    return report


async def _reconcile_archived(report: Report, db: async_sessionmaker[AsyncSession], state: SaleState) -> None:
    """An archived sale's orders live in SQL only: its figures must add up to them."""
    report.archived = True
    async with db() as session:
        if await session.get(Sale, report.sale_id) is None:
            report.problems.append("sale not in SQL")
        rows = (await session.scalars(select(Order).where(Order.sale_id == report.sale_id))).all()
    report.sql_orders = len(rows)
    _check_holdings(report, state.limit, ((r.status, r.quantity, r.buyer_id) for r in rows),
                    "archived sale's counters disagree with SQL")


def _check_holdings(report: Report, limit: int, orders: Iterable[tuple[str, int, str]], problem: str) -> None:
    """The units the orders (status, quantity, buyer) hold match the sale's counters; no buyer over the limit."""
    by_status = {"reserved": 0, "paid": 0}
    per_buyer: dict[str, int] = {}
    for status, quantity, buyer in orders:
        if status in by_status:
            by_status[status] += quantity
            per_buyer[buyer] = per_buyer.get(buyer, 0) + quantity
    if by_status["reserved"] != report.reserved or by_status["paid"] != report.paid:
        report.problems.append(f"{problem}: orders hold {by_status}")
    for buyer, held in per_buyer.items():
        if held > limit:
            report.problems.append(f"buyer {buyer} holds {held} > limit {limit}")
