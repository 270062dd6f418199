"""Buyers: each its own keep-alive connection(s), clicking at the sale's start.

They behave as buyers in a rush do: a retry after a timeout or a dropped
connection reuses the same Idempotency-Key (the outcome was unknown); a 429 or
a too-early click is retried after a pause with the same key (nothing was
taken); some click twice, some try past their limit, some hammer.
"""

from __future__ import annotations

import asyncio
import random
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import get_args

from load.http import Connection, HttpError, Response, Target
from load.messages import Attempt, BuyerMix, BuyerRecord
from server.inventory.records import StockRefusal

# The purchase's refusals, in the server's words (reserve.lua's statuses).
REFUSALS: frozenset[str] = frozenset(get_args(StockRefusal)) | {"key_reused"}
# Refusals that hold for good once given, as nothing is released during a run: a lost try of the
# same key, run after one of these, meets it too (and one run before would have made it a 200).
FINAL: frozenset[StockRefusal] = frozenset({"sold_out", "not_enough", "limit_exceeded", "ended"})
MAX_RETRY_AFTER_S = 2.0


def assign_styles(n: int, mix: BuyerMix, rng: random.Random) -> list[str]:
    """Exact shares (rounded), shuffled, so small runs still have every kind of buyer."""
    styles: list[str] = []
    for style, share in (("hammer", mix.hammer), ("double_click", mix.double_click), ("greedy", mix.greedy),
                         ("bulk", mix.bulk), ("early", mix.early)):
        styles += [style] * min(n - len(styles), round(n * share))
    styles += ["normal"] * (n - len(styles))
    rng.shuffle(styles)
    return styles


def retry_after(r: Response, default: float) -> float:
    try:
        return min(MAX_RETRY_AFTER_S, float(r.headers.get("retry-after", default)))
    except ValueError:
        return default


def _lost(exc: HttpError) -> str:
    """The outcome of a try whose answer never came."""
    return "timeout" if "Timeout" in str(exc) else "conn_error"


def classify(r: Response) -> str:
    if r.status == 201:
        return "reserved"
    if r.status == 200:
        return "duplicate"
    if r.status == 429:
        return "rate_limited"
    code = r.error_code
    if r.status in (409, 422) and code in REFUSALS:
        return code
    return f"http_{r.status}" + (f"_{code}" if code else "")


@dataclass
class Counters:
    attempts: int = 0
    reserved: int = 0
    errors: int = 0
    rate_limited: int = 0
    done: int = 0


@dataclass
class BuyContext:
    target: Target
    sale_id: str
    starts_at_ms: int
    offset_ms: float  # server clock minus ours
    limit: int
    mix: BuyerMix
    deadline: float   # time.monotonic() after which nobody sends again
    attempts: list[Attempt] = field(default_factory=list)
    counters: Counters = field(default_factory=Counters)

    def server_ms(self) -> float:
        return time.time() * 1000 + self.offset_ms


class Buyer:
    def __init__(self, ctx: BuyContext, index: int, record: BuyerRecord, rng: random.Random) -> None:
        self.ctx = ctx
        self.index = index
        self.record = record
        self.rng = rng
        self.orders: dict[str, int] = {}  # order id -> quantity, as answered
        self._conns: list[Connection] = []

    def _conn(self) -> Connection:
        conn = Connection(self.ctx.target, connect_timeout=self.ctx.mix.timeout_s)
        self._conns.append(conn)
        return conn

    async def run(self) -> None:
        ctx, style = self.ctx, self.record.style
        try:
            if style == "early":
                fire_at = ctx.starts_at_ms - self.rng.uniform(50, 300)
            else:
                fire_at = ctx.starts_at_ms + self.rng.uniform(0, ctx.mix.spread_s * 1000)
            await asyncio.sleep(max(0.0, (fire_at - ctx.server_ms()) / 1000))
            conn = self._conn()
            if style == "hammer":
                conns = [conn] + [self._conn() for _ in range(ctx.mix.hammer_burst - 1)]
                await asyncio.gather(*(self.buy(c, self.new_key(), 1, retry_429=False) for c in conns))
            elif style == "double_click":
                key = self.new_key()
                await asyncio.gather(self.buy(conn, key, 1), self.buy(self._conn(), key, 1))
            elif style == "greedy":
                for _ in range(ctx.limit + 2):
                    if await self.buy(conn, self.new_key(), 1) not in ("reserved", "duplicate"):
                        break  # (a duplicate: a retry got the order of a lost answer)
            else:
                await self.buy(conn, self.new_key(), ctx.limit if style == "bulk" else 1)
            if self.orders and self.rng.random() < ctx.mix.pay:
                for order_id in list(self.orders):
                    await self.pay(conn, order_id)
        except Exception as exc:  # an answer it could not read: the verdict says so (it fails)
            self.record.crashed = repr(exc)[:300]
        finally:
            ctx.counters.done += 1
            for c in self._conns:
                await c.close()

    def new_key(self) -> str:
        return f"{self.index}-{secrets.token_hex(8)}"

    async def buy(self, conn: Connection, key: str, quantity: int, *, retry_429: bool = True) -> str:
        """Send one purchase until its outcome is known (or retries run out); return the outcome.

        The key stays *unanswered* (it may have reserved: the verdict allows for that) from a try
        that may have run the script (a timeout, a dropped connection, a 5xx other than `busy`,
        which is shed before it) unless a later try settles it: a 200/201 (its order) or a
        refusal that holds for good (FINAL). A 429 or `not_started` does not: the lost try may
        still run on the server after it, and get through."""
        ctx = self.ctx
        path = f"/api/sales/{ctx.sale_id}/purchase"
        headers = {"Authorization": f"Bearer {self.record.token}", "Idempotency-Key": key}
        body = b'{"quantity":%d}' % quantity
        outcome = "none"
        unknown = False
        try:
            for try_no, at, t0 in self._tries():
                wait = 0.0
                try:
                    r = await conn.request("POST", path, body=body, headers=headers, timeout=ctx.mix.timeout_s)
                except asyncio.CancelledError:
                    unknown = True  # cut off at the deadline mid-request: it may have reserved
                    raise
                except HttpError as exc:
                    outcome = _lost(exc)
                    self._record(key, try_no, at, t0, outcome, 0, quantity)
                    ctx.counters.errors += 1
                    unknown = True
                    wait = self._backoff(try_no)  # then the same key again
                else:
                    outcome = classify(r)
                    order_id, answered = "", 0
                    if r.status in (200, 201):
                        data = r.json()
                        order_id, answered = str(data["order_id"]), int(data["quantity"])
                        self.orders[order_id] = answered
                        if r.status == 201:
                            ctx.counters.reserved += 1
                    self._record(key, try_no, at, t0, outcome, r.status, quantity, order_id, answered_qty=answered)
                    if r.status in (200, 201) or outcome in FINAL:
                        unknown = False
                    elif r.status >= 500 and r.error_code != "busy":
                        unknown = True
                    if outcome == "rate_limited":
                        ctx.counters.rate_limited += 1
                        if not retry_429:
                            return outcome
                        wait = self._retry_wait(r, 1.0)
                    elif outcome == "not_started":
                        wait = self.rng.uniform(0.05, 0.2)
                    elif outcome.startswith("http_5"):
                        ctx.counters.errors += 1
                        wait = self._retry_wait(r, 0.5)
                    else:
                        return outcome
                if try_no < ctx.mix.retries:
                    await asyncio.sleep(wait)
            return outcome
        finally:  # also when cut off at the deadline while backing off
            if unknown:
                self.record.unknown_keys[key] = quantity

    async def pay(self, conn: Connection, order_id: str) -> None:
        ctx = self.ctx
        headers = {"Authorization": f"Bearer {self.record.token}"}
        answered = False
        try:
            for try_no, at, t0 in self._tries():
                try:
                    r = await conn.request("POST", f"/api/orders/{order_id}/pay", headers=headers,
                                           timeout=ctx.mix.timeout_s)
                except HttpError as exc:
                    self._record(order_id, try_no, at, t0, _lost(exc), 0, 0, order_id, kind="pay")
                    await asyncio.sleep(self._backoff(try_no))
                    continue  # paying again is safe: a paid order answers 200 and is charged once
                outcome = "paid" if r.status == 200 else f"http_{r.status}_{r.error_code}"
                self._record(order_id, try_no, at, t0, outcome, r.status, 0, order_id, kind="pay")
                if r.status == 200:
                    self.record.paid.append(order_id)
                if r.status != 429 and r.status < 500:
                    answered = True  # a definite answer; a 429 or 5xx leaves it open
                    break
                await asyncio.sleep(self._retry_wait(r, 0.5))
        finally:  # also when cut off at the deadline
            if not answered:
                self.record.unknown_pays.append(order_id)  # it may have gone through: the verdict allows for it

    def _tries(self) -> Iterator[tuple[int, float, float]]:
        """One request's tries while the run's deadline allows: the try's number, its send time on
        the server's clock, and the counter its latency is timed from."""
        for try_no in range(self.ctx.mix.retries + 1):
            if time.monotonic() > self.ctx.deadline:
                return
            yield try_no, self.ctx.server_ms(), time.perf_counter()

    def _backoff(self, try_no: int) -> float:
        """The wait after a try whose answer was lost: doubling, with jitter."""
        return 0.2 * 2.0 ** try_no * self.rng.uniform(0.5, 1.5)

    def _retry_wait(self, r: Response, default: float) -> float:
        """1 to 1.5 times the server's Retry-After, as the room page waits: a crowd told "retry in
        1 s" comes back spread out."""
        return retry_after(r, default) * self.rng.uniform(1.0, 1.5)

    def _record(self, key: str, try_no: int, at: float, t0: float, outcome: str, status: int, quantity: int,
                order_id: str = "", kind: str = "purchase", answered_qty: int = 0) -> None:
        if kind == "purchase":  # the progress line counts purchase attempts, as the summary does
            self.ctx.counters.attempts += 1
        self.ctx.attempts.append(Attempt(
            buyer=self.index, key=key, try_no=try_no, at_ms=at, latency_ms=(time.perf_counter() - t0) * 1000,
            outcome=outcome, status=status, quantity=quantity, order_id=order_id, kind=kind,
            answered_qty=answered_qty))
