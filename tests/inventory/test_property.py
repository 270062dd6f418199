"""Property-based: random interleavings of reserve / pay / expire / cancel on one sale, run through
`Stock` against real Redis, checked against a model after every step.

Hypothesis drives the steps from a worker thread; each step runs on the session's event loop
(where the Redis client lives) through run_coroutine_threadsafe. Each example gets a fresh sale,
either with a 1 ms payment timeout (every reservation is expirable at once: before acting on an
order the machine makes sure the Redis clock has passed its pay-by, so expiring always releases
and paying always comes too late) or with an hour (expiring is never due, paying always works).
Either way every outcome is determined, so the model predicts each one exactly; the race of
paying against expiring at the deadline is tested in inventory/test_orders.py."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from server import clock
from server.ids import new_id
from server.inventory import keys
from server.inventory.records import Change, SaleInfo, Terms
from server.inventory.schemas import SaleProduct
from server.inventory.stock import new_order_id
from tests.inventory.support import World, hash_ints, idem_key, redis_now_ms, stream_records, zset_members

T = TypeVar("T")
STEP_TIMEOUT_S = 30.0  # a guard against a hung step, not an assertion about speed
INFO = SaleInfo(product=SaleProduct(id="p", name="p", description="", image_url=None, list_price_cents=500))


@pytest.fixture
async def world(redis_url: str, sql_url: str) -> AsyncIterator[World]:
    """On SQLite, then on PostgreSQL."""
    async with World.open(redis_url, sql_url) as w:
        yield w


@dataclass
class ModelOrder:
    id: str
    buyer: str
    key: str
    quantity: int
    status: str = "reserved"


@dataclass
class Model:
    stock: int
    limit: int
    tiny: bool  # 1 ms payment timeout
    remaining: int
    orders: dict[str, ModelOrder] = field(default_factory=dict)  # in creation order
    by_key: dict[tuple[str, str], str] = field(default_factory=dict)
    changes: int = 0  # state changes, each bumps the sale's version once

    def held(self, buyer: str) -> int:
        return sum(o.quantity for o in self.orders.values() if o.buyer == buyer and o.status in ("reserved", "paid"))

    def units(self, status: str) -> int:
        return sum(o.quantity for o in self.orders.values() if o.status == status)


def make_machine(world: World, loop: asyncio.AbstractEventLoop) -> type[RuleBasedStateMachine]:
    def run(coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, loop).result(STEP_TIMEOUT_S)

    class StockMachine(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.sale_id = ""
            self.buyers: list[str] = []
            self.model = Model(0, 0, False, 0)

        @initialize(stock=st.integers(1, 6), limit=st.integers(1, 3), buyers=st.integers(1, 4), tiny=st.booleans())
        def launch(self, stock: int, limit: int, buyers: int, tiny: bool) -> None:
            self.sale_id = new_id("sale")
            self.buyers = [new_id("usr") for _ in range(buyers)]
            self.model = Model(stock, limit, tiny, stock)
            now = clock.to_ms(clock.utcnow())
            run(world.stock.create(Terms(
                sale_id=self.sale_id, room_id=new_id("room"), stock=stock, per_user_limit=limit, price_cents=500,
                starts_at_ms=now - 5_000, ends_at_ms=now + 3_600_000,
                payment_timeout_ms=1 if tiny else 3_600_000, info=INFO)))

        # --- steps ---------------------------------------------------------------------------
        @rule(data=st.data(), quantity=st.integers(1, 3))
        def reserve(self, data: st.DataObject, quantity: int) -> None:
            m = self.model
            buyer = data.draw(st.sampled_from(self.buyers), label="buyer")
            used = sorted(k for b, k in m.by_key if b == buyer)
            retry = bool(used) and data.draw(st.booleans(), label="retry")
            key = data.draw(st.sampled_from(used), label="old key") if retry else idem_key()
            out = run(world.stock.reserve(self.sale_id, buyer, key, new_order_id(self.sale_id), quantity, None))
            if (buyer, key) in m.by_key:
                known = m.orders[m.by_key[(buyer, key)]]
                want = "duplicate" if known.quantity == quantity else "key_reused"
                assert out.status == want and out.order is not None and out.order.id == known.id, out
                return
            held = m.held(buyer)
            if held + quantity > m.limit:
                want = "limit_exceeded"
            elif m.remaining == 0:
                want = "sold_out"
            elif m.remaining < quantity:
                want = "not_enough"
            else:
                want = "reserved"
            assert out.status == want, (out, m.remaining, held)
            if want == "reserved":
                assert out.order is not None and out.remaining == m.remaining - quantity
                m.remaining -= quantity
                m.orders[out.order.id] = ModelOrder(out.order.id, buyer, key, quantity)
                m.by_key[(buyer, key)] = out.order.id
                m.changes += 1
            else:
                assert out.order is None

        def _pick(self, data: st.DataObject) -> ModelOrder:
            """An order by its creation index (ids are random; indexes replay the same)."""
            o = self.model.orders[data.draw(st.sampled_from(list(self.model.orders)), label="order")]
            if self.model.tiny and o.status == "reserved":
                run(self._until_due(o.id))
            return o

        async def _until_due(self, order_id: str) -> None:
            rec = await world.stock.order(self.sale_id, order_id)
            assert rec is not None
            for _ in range(100):  # bounded: the pay-by is 1 ms after the reservation
                if await redis_now_ms(world.redis) > rec.pay_by:
                    return
                await asyncio.sleep(0.001)
            raise AssertionError("the Redis clock did not pass a 1 ms pay-by")

        @precondition(lambda self: bool(self.model.orders))
        @rule(data=st.data(), stranger=st.booleans())
        def pay(self, data: st.DataObject, stranger: bool) -> None:
            o = self._pick(data)
            payer = new_id("usr") if stranger else o.buyer
            out = run(world.stock.pay(self.sale_id, o.id, payer, "pref"))
            if stranger:
                assert out.status == "no_order", out
            elif o.status == "reserved":
                if self.model.tiny:
                    assert out.status == "expired", out  # too late: nothing changes until it is released
                else:
                    assert out.status == "paid" and out.order is not None and out.order.payment == "pref", out
                    o.status = "paid"
                    self.model.changes += 1
            else:
                assert out.status == ("already_paid" if o.status == "paid" else o.status), out

        def _release(self, o: ModelOrder, reason: str, outs: list[Change]) -> None:
            statuses = [x.status for x in outs]
            if o.status != "reserved":
                assert set(statuses) == {o.status}, statuses  # released at most once
                return
            if reason == "expired" and not self.model.tiny:
                assert set(statuses) == {"not_due"}, statuses
                return
            # One call releases; any others running beside it find it released already.
            assert sorted(statuses) == sorted(["released"] + [reason] * (len(outs) - 1)), statuses
            released = next(x for x in outs if x.status == "released")
            o.status = reason
            self.model.remaining += o.quantity
            assert released.remaining == self.model.remaining
            assert released.order is not None and released.order.status == reason
            self.model.changes += 1

        @precondition(lambda self: bool(self.model.orders))
        @rule(data=st.data(), concurrent=st.sampled_from([1, 1, 5]))
        def expire(self, data: st.DataObject, concurrent: int) -> None:
            o = self._pick(data)

            async def many() -> list[Change]:
                return list(await asyncio.gather(*(world.stock.release(self.sale_id, o.id, "expired")
                                                   for _ in range(concurrent))))

            self._release(o, "expired", run(many()))

        @precondition(lambda self: bool(self.model.orders))
        @rule(data=st.data(), stranger=st.booleans())
        def cancel(self, data: st.DataObject, stranger: bool) -> None:
            o = self._pick(data)
            if stranger:
                out = run(world.stock.release(self.sale_id, o.id, "cancelled", new_id("usr")))
                assert out.status == "no_order", out
                return
            self._release(o, "cancelled", [run(world.stock.release(self.sale_id, o.id, "cancelled", o.buyer))])

        # --- what must hold after every step --------------------------------------------------
        @invariant()
        def consistent(self) -> None:
            if not self.sale_id:
                return
            m = self.model
            state, orders, buyers, due, records = run(self._read())
            assert state is not None
            assert state.remaining >= 0
            assert state.remaining + state.reserved + state.paid == state.stock == m.stock, state
            assert (state.remaining, state.reserved, state.paid) == \
                (m.remaining, m.units("reserved"), m.units("paid")), (state, m)
            assert state.v == 1 + m.changes
            # the records agree with the counters and the model
            assert {i: o.status for i, o in orders.items()} == {i: o.status for i, o in m.orders.items()}
            assert sum(o.quantity for o in orders.values() if o.status == "reserved") == state.reserved
            assert sum(o.quantity for o in orders.values() if o.status == "paid") == state.paid
            per_buyer: dict[str, int] = defaultdict(int)
            for o in orders.values():
                if o.status in ("reserved", "paid"):
                    per_buyer[o.user_id] += o.quantity
            assert {b: h for b, h in buyers.items() if h} == dict(per_buyer)
            assert all(h <= m.limit for h in buyers.values()) and all(h >= 0 for h in buyers.values())
            assert due == {i for i, o in orders.items() if o.status == "reserved"}
            # the stream: per order, reserved then at most one more change, versions in order
            history: dict[str, list[tuple[str, int]]] = defaultdict(list)
            for rec in records:
                history[rec["id"]].append((rec["status"], rec["v"]))
            assert set(history) == set(orders)
            for order_id, steps in history.items():
                assert steps[0] == ("reserved", 1), steps
                assert len(steps) <= 2, f"{order_id} changed more than once after reserving: {steps}"
                assert [v for _, v in steps] == list(range(1, len(steps) + 1))
                assert steps[-1] == (orders[order_id].status, orders[order_id].v)

        async def _read(self) -> tuple[Any, ...]:
            state = await world.stock.state(self.sale_id)
            orders = await world.stock.orders(self.sale_id)
            buyers = await hash_ints(world.redis, keys.buyers(self.sale_id))
            due = await zset_members(world.redis, keys.expiry(self.sale_id))
            records = await stream_records(world.redis, self.sale_id)
            return state, orders, buyers, due, records

    return StockMachine


async def test_random_interleavings_keep_the_stock_invariants(world: World) -> None:
    machine = make_machine(world, asyncio.get_running_loop())
    config = settings(max_examples=30, stateful_step_count=30, deadline=None, database=None,
                      suppress_health_check=[HealthCheck.too_slow])
    await asyncio.to_thread(run_state_machine_as_test, machine, settings=config)
