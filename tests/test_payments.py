"""Paying through SaleService against the real engine, with a provider that records what it was
asked: the authorization stored with the order is captured even when the answer to the payment
was lost (by the buyer's retry, or else by the sweeper), and concurrent payments of one order take
one authorization, never void it."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import pytest
from redis.exceptions import TimeoutError as RedisTimeoutError

from server.auth import Principal
from server.inventory.payments import Authorization, SimulatedPayments
from server.inventory.sales import SaleService
from server.inventory import keys
from server.inventory.stock import Outcome, Stock
from server.inventory.sweeper import Sweeper
from tests.inventory_support import World


class RecordingPayments(SimulatedPayments):
    """The bundled provider (idempotent per order), remembering every call."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    async def authorize(self, order_id: str, amount_cents: int, buyer_id: str) -> Authorization:
        auth = await super().authorize(order_id, amount_cents, buyer_id)
        self.calls.append(("authorize", auth.reference))
        return auth

    async def capture(self, auth: Authorization) -> None:
        self.calls.append(("capture", auth.reference))

    async def void(self, auth: Authorization) -> None:
        self.calls.append(("void", auth.reference))

    def count(self, kind: str) -> Counter[str]:
        return Counter(ref for k, ref in self.calls if k == kind)


class LostAnswerStock(Stock):
    """Runs the pay script, then loses its answer once, as a Redis timeout after the write would."""

    lose_next = False

    async def pay(self, sale_id: str, order_id: str, user_id: str, payment_ref: str) -> Outcome:
        outcome = await super().pay(sale_id, order_id, user_id, payment_ref)
        if self.lose_next:
            self.lose_next = False
            raise RedisTimeoutError("the answer was lost on the way")
        return outcome


class Notes:
    def touch(self, sale_id: str, room_id: str) -> None:
        pass


@pytest.fixture
async def world(redis_url: str, tmp_path: Path) -> AsyncIterator[World]:
    async with World.open(redis_url, tmp_path / "payments.db") as w:
        yield w


async def paying_setup(world: World) -> tuple[SaleService, LostAnswerStock, RecordingPayments, Principal, str, str]:
    sale = await world.add_sale(stock=5, limit=2, price_cents=1250)
    (buyer,) = await world.add_users(1)
    reserved = await world.reserve(sale.sale_id, buyer, quantity=2)
    assert reserved.status == "reserved" and reserved.order is not None
    stock = LostAnswerStock(world.redis, world.stock.group.removeprefix("persister:"))
    payments = RecordingPayments()
    # Paying touches neither the settings nor the rooms; the notifier is asked to announce the sale.
    service = SaleService(cast(Any, None), stock, world.db, cast(Any, None), payments, cast(Any, Notes()))
    me = Principal(buyer, "viewer", "buyer", "session", time.time() + 3600)
    return service, stock, payments, me, sale.sale_id, reserved.order["id"]


async def test_a_payment_whose_answer_was_lost_is_captured_when_the_buyer_retries(world: World) -> None:
    service, stock, payments, me, sale_id, order_id = await paying_setup(world)
    try:
        stock.lose_next = True
        with pytest.raises(RedisTimeoutError):
            await service.pay(me, order_id)
        stored = await stock.order(sale_id, order_id)
        assert stored is not None and stored["status"] == "paid"
        assert payments.count("capture") == Counter()  # the request died before its capture

        again = await service.pay(me, order_id)  # the buyer retries
        assert again.status == "paid" and again.total_cents == 2500
        assert payments.count("capture") == Counter({stored["payment"]: 1})
        assert payments.count("void") == Counter()
    finally:
        stock.disconnect()


async def test_concurrent_payments_of_one_order_capture_its_one_authorization_and_void_nothing(
        world: World) -> None:
    service, stock, payments, me, sale_id, order_id = await paying_setup(world)
    try:
        answers = await asyncio.gather(*(service.pay(me, order_id) for _ in range(8)))
        assert {a.status for a in answers} == {"paid"}
        stored = await stock.order(sale_id, order_id)
        assert stored is not None
        assert set(payments.count("authorize")) <= {stored["payment"]}  # one reference per order
        assert set(payments.count("capture")) == {stored["payment"]}  # captured, idempotently
        assert payments.count("void") == Counter()
        state = await stock.state(sale_id)
        assert state is not None and (state["paid"], state["reserved"]) == (2, 0)
    finally:
        stock.disconnect()


async def captures_due(world: World, sale_id: str) -> int:
    return int(await world.redis.zcard(keys.captures(sale_id)))


async def test_a_payment_that_went_through_owes_no_capture(world: World) -> None:
    service, stock, payments, me, sale_id, order_id = await paying_setup(world)
    try:
        assert (await service.pay(me, order_id)).status == "paid"
        assert await captures_due(world, sale_id) == 0
        assert payments.count("capture") == Counter({(await stock.order(sale_id, order_id) or {})["payment"]: 1})
    finally:
        stock.disconnect()


async def test_a_payment_whose_request_died_is_captured_by_the_sweeper_once_due(world: World) -> None:
    """The pay script ran, the answer was lost, and the buyer never came back: the capture comes due
    (here at once) and the sweeper takes it, once; until then the sale cannot be closed as settled."""
    service, stock, payments, me, sale_id, order_id = await paying_setup(world)
    stock.capture_after_ms = 0
    try:
        stock.lose_next = True
        with pytest.raises(RedisTimeoutError):
            await service.pay(me, order_id)
        assert await captures_due(world, sale_id) == 1
        assert await stock.end(sale_id, "host")
        persister = world.persister("settle-check")
        for _ in range(3):  # the first read makes the consumer group
            await persister.drain(sale_id)
        assert not await persister.settled(sale_id)  # ended, nothing reserved, all in SQL: a capture is owed

        sweeper = Sweeper(stock, service, cast(Any, Notes()))
        await sweeper.sweep_sale(sale_id)
        await sweeper.sweep_sale(sale_id)  # nothing left the second time
        stored = await stock.order(sale_id, order_id)
        assert stored is not None and stored["status"] == "paid"
        assert payments.count("capture") == Counter({stored["payment"]: 1})
        assert await captures_due(world, sale_id) == 0
        assert await persister.settled(sale_id)
    finally:
        stock.disconnect()
