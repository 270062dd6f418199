"""Paying through the buying service (server/inventory/orders.py) against the real engine, with providers that record what they were
asked: the authorization stored with the order is captured even when the answer to the payment
was lost (by the buyer's retry, or else by the jobs process's late captures), a provider failing
at capture never fails a paid order nor stops other captures, and concurrent payments of one
order never void the authorization that paid."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, cast

import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from server.auth import Principal
from server.errors import Conflict, NotFound, PaymentRequired, Unavailable
from server.inventory import keys
from server.inventory.captures import RETRY_AFTER_MS, LateCaptures
from server.inventory.orders import Orders
from server.inventory.payments import Authorization, PaymentDeclined, SimulatedPayments
from server.inventory.persister import Persister
from server.inventory.reconcile import reconcile
from server.inventory.records import Change
from server.inventory.schemas import PurchaseIn
from server.inventory.stock import Stock
from tests.inventory.support import World
from tests.support import DB_IN_PROCESS, open_redis, redis_db_url


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


class OnePerCallPayments(RecordingPayments):
    """A provider whose authorize is not idempotent: a new reference on every call."""

    async def authorize(self, order_id: str, amount_cents: int, buyer_id: str) -> Authorization:
        auth = Authorization(f"sim_{secrets.token_hex(8)}", amount_cents)
        self.calls.append(("authorize", auth.reference))
        return auth


class FailingCapturePayments(RecordingPayments):
    failing = True

    async def capture(self, auth: Authorization) -> None:
        if self.failing:
            raise ConnectionError("the provider is unreachable")
        await super().capture(auth)


class LostAnswerStock(Stock):
    """Runs the pay script, then loses its answer once, as a Redis timeout after the write would."""

    lose_next = False

    async def pay(self, sale_id: str, order_id: str, user_id: str, payment_ref: str) -> Change:
        outcome = await super().pay(sale_id, order_id, user_id, payment_ref)
        if self.lose_next:
            self.lose_next = False
            raise RedisTimeoutError("the answer was lost on the way")
        return outcome


@pytest.fixture
async def world(redis_url: str, sql_url: str) -> AsyncIterator[World]:
    """On SQLite, then on PostgreSQL."""
    async with World.open(redis_url, sql_url) as w:
        yield w


Paying = tuple[Orders, LostAnswerStock, RecordingPayments, Principal, str, str]


@pytest.fixture
async def paying(world: World) -> AsyncIterator[Paying]:
    """A reserved order of 2 units at 12.50, and the service to pay it: (service, stock, payments,
    buyer, sale id, order id)."""
    sale = await world.add_sale(stock=5, limit=2, price_cents=1250)
    (buyer,) = await world.add_users(1)
    reserved = await world.reserve(sale.sale_id, buyer, quantity=2)
    assert reserved.status == "reserved" and reserved.order is not None
    stock = LostAnswerStock(world.redis, world.stock.group.removeprefix("persister:"))
    payments = RecordingPayments()
    service = world.orders(payments, stock=stock)
    me = Principal(buyer, "viewer", "buyer", "session", time.time() + 3600)
    try:
        yield service, stock, payments, me, sale.sale_id, reserved.order.id
    finally:
        stock.disconnect()


async def test_a_payment_whose_answer_was_lost_is_captured_when_the_buyer_retries(world: World, paying: Paying) -> None:
    service, stock, payments, me, sale_id, order_id = paying
    stock.lose_next = True
    with pytest.raises(RedisTimeoutError):
        await service.pay(me, order_id)
    stored = await stock.order(sale_id, order_id)
    assert stored is not None and stored.status == "paid"
    assert payments.count("capture") == Counter()  # the request died before its capture

    again = await service.pay(me, order_id)  # the buyer retries
    assert again.status == "paid" and again.total_cents == 2500
    assert payments.count("capture") == Counter({stored.payment: 1})
    assert payments.count("void") == Counter()
    assert await captures_due(world, sale_id) == 0
    assert (await service.pay(me, order_id)).status == "paid"  # once more: nothing is owed, no call
    assert payments.count("capture") == Counter({stored.payment: 1})


async def test_concurrent_payments_of_one_order_capture_its_one_authorization_and_void_nothing(
        paying: Paying) -> None:
    service, stock, payments, me, sale_id, order_id = paying
    answers = await asyncio.gather(*(service.pay(me, order_id) for _ in range(8)))
    assert {a.status for a in answers} == {"paid"}
    stored = await stock.order(sale_id, order_id)
    assert stored is not None
    assert set(payments.count("authorize")) <= {stored.payment}  # one reference per order
    assert set(payments.count("capture")) == {stored.payment}  # captured, idempotently
    assert payments.count("void") == Counter()
    state = await stock.state(sale_id)
    assert state is not None and (state.paid, state.reserved) == (2, 0)


async def captures_due(world: World, sale_id: str) -> int:
    return int(await world.redis.zcard(keys.captures(sale_id)))


async def test_a_payment_that_went_through_owes_no_capture(world: World, paying: Paying) -> None:
    service, stock, payments, me, sale_id, order_id = paying
    assert (await service.pay(me, order_id)).status == "paid"
    assert await captures_due(world, sale_id) == 0
    stored = await stock.order(sale_id, order_id)
    assert stored is not None and payments.count("capture") == Counter({stored.payment: 1})


async def test_a_payment_whose_request_died_is_captured_by_the_jobs_process_once_due(
        world: World, paying: Paying) -> None:
    """The pay script ran, the answer was lost, and the buyer never came back: the capture comes due
    (here at once) and the late captures take it, once; until then the sale cannot settle."""
    service, stock, payments, me, sale_id, order_id = paying
    stock.capture_after_ms = 0
    stock.lose_next = True
    with pytest.raises(RedisTimeoutError):
        await service.pay(me, order_id)
    assert await captures_due(world, sale_id) == 1
    assert await stock.end(sale_id, "host")
    persister = world.persister("settle-check")
    for _ in range(3):  # the first read makes the consumer group
        await persister.drain(sale_id)
    assert not await persister.settled(sale_id)  # ended, nothing reserved, all in SQL: a capture is owed
    assert (await reconcile(stock, world.db, sale_id)).captures_owed == 1

    late = LateCaptures(stock, service)
    assert await late.pass_sale(sale_id, int(time.time() * 1000) + 1000) == 1
    assert await late.pass_sale(sale_id, int(time.time() * 1000) + 1000) == 0  # nothing left
    stored = await stock.order(sale_id, order_id)
    assert stored is not None and stored.status == "paid"
    assert payments.count("capture") == Counter({stored.payment: 1})
    assert await captures_due(world, sale_id) == 0
    assert await persister.settled(sale_id)
    report = await reconcile(stock, world.db, sale_id)
    assert report.ok and report.captures_owed == 0, report.lines()


class DecliningPayments(RecordingPayments):
    async def authorize(self, order_id: str, amount_cents: int, buyer_id: str) -> Authorization:
        raise PaymentDeclined("the card was declined")


async def test_a_declined_payment_answers_402_and_leaves_the_order_reserved(paying: Paying) -> None:
    service, stock, _, me, sale_id, order_id = paying
    service._payments = declining = DecliningPayments()  # noqa: SLF001
    with pytest.raises(PaymentRequired) as refused:
        await service.pay(me, order_id)
    assert (refused.value.status, refused.value.code) == (402, "payment_declined")
    stored = await stock.order(sale_id, order_id)
    assert stored is not None and stored.status == "reserved"
    assert declining.calls == []
    service._payments = RecordingPayments()  # noqa: SLF001  # another card
    assert (await service.pay(me, order_id)).status == "paid"


def after_first_round_trip(client: Redis, interlope: Callable[[], Awaitable[None]]) -> list[bool]:
    """Run `interlope` once, right after the client's first command or pipeline is answered; the
    list it returns holds True once it ran."""
    ran: list[bool] = []

    async def once() -> None:
        if not ran:
            ran.append(True)
            await interlope()

    command, make_pipeline = client.execute_command, client.pipeline

    async def execute_command(*args: Any, **options: Any) -> Any:
        reply = await command(*args, **options)  # type: ignore[no-untyped-call]
        await once()
        return reply

    def pipeline(*args: Any, **options: Any) -> Any:
        pipe = make_pipeline(*args, **options)
        execute = pipe.execute

        async def execute_then(*eargs: Any, **eoptions: Any) -> Any:
            replies = await execute(*eargs, **eoptions)
            await once()
            return replies
        pipe.execute = execute_then  # type: ignore[method-assign]
        return pipe

    client.execute_command = execute_command  # type: ignore[method-assign]
    client.pipeline = pipeline  # type: ignore[method-assign]
    return ran


async def test_a_sale_is_not_settled_by_a_check_that_a_payment_overtook(
        world: World, paying: Paying, redis_url: str) -> None:
    """The ended sale's last reserved order is paid (its capture failing, so owed) and persisted by
    another jobs process while settled() is looking: settled() answers from one instant, so it does
    not close a sale that owes a capture (late captures visit open sales only)."""
    service, stock, _, me, sale_id, order_id = paying
    service._payments = FailingCapturePayments()  # noqa: SLF001
    other = world.persister("other")
    assert await stock.end(sale_id, "host")
    for _ in range(3):  # the reservation reaches SQL: nothing pending
        await other.drain(sale_id)

    async def pay_and_persist() -> None:
        assert (await service.pay(me, order_id)).status == "paid"
        await other.drain(sale_id)

    async with open_redis(redis_db_url(redis_url, DB_IN_PROCESS), 2) as client:  # the world's, hooked
        ran = after_first_round_trip(client, pay_and_persist)
        hooked = Stock(client, world.stock.group.removeprefix("persister:"))  # the checker reads through it
        checker = Persister(client, hooked, world.db, consumer="checker")
        try:
            settled = await checker.settled(sale_id)
            assert ran and await captures_due(world, sale_id) == 1
            assert not settled
            assert not await checker.settled(sale_id)
        finally:
            hooked.disconnect()


async def test_a_provider_failing_at_capture_fails_no_paid_order_and_holds_up_no_other_capture(
        world: World, paying: Paying) -> None:
    service, stock, _, me, sale_id, order_id = paying
    payments = FailingCapturePayments()
    service._payments = payments  # noqa: SLF001
    stock.capture_after_ms = 0
    paid = await service.pay(me, order_id)  # the capture fails: the order is paid all the same
    assert paid.status == "paid" and await captures_due(world, sale_id) == 1

    # A second order in the same sale, paid while the provider works, whose request died before
    # it captured: due as well.
    (other_buyer,) = await world.add_users(1)
    other = await world.reserve(sale_id, other_buyer)
    assert other.order is not None
    payments.failing = False
    stock.lose_next = True
    with pytest.raises(RedisTimeoutError):
        await service.pay(Principal(other_buyer, "viewer", "b", "s", time.time() + 3600), other.order.id)
    payments.failing = True

    late = LateCaptures(stock, service)
    now_ms = int(time.time() * 1000) + 1000
    assert await late.pass_sale(sale_id, now_ms) == 0  # both fail, neither stops the pass
    scores = dict(await world.redis.zrange(keys.captures(sale_id), 0, -1, withscores=True))
    assert {k.decode(): int(v) for k, v in scores.items()} == {
        order_id: now_ms + RETRY_AFTER_MS, other.order.id: now_ms + RETRY_AFTER_MS}

    payments.failing = False
    assert await late.pass_sale(sale_id, now_ms) == 0  # not due again before the retry time
    assert await late.pass_sale(sale_id, now_ms + RETRY_AFTER_MS) == 2
    assert await captures_due(world, sale_id) == 0
    assert len(payments.count("capture")) == 2


async def test_with_a_new_reference_per_authorize_the_losers_are_voided_and_the_payer_never(
        world: World, paying: Paying) -> None:
    service, stock, _, me, sale_id, order_id = paying
    payments = OnePerCallPayments()
    service._payments = payments  # noqa: SLF001
    answers = await asyncio.gather(*(service.pay(me, order_id) for _ in range(6)))
    assert {a.status for a in answers} == {"paid"}
    stored = await stock.order(sale_id, order_id)
    assert stored is not None
    authorized = set(payments.count("authorize"))
    assert stored.payment in authorized
    assert set(payments.count("void")) == authorized - {stored.payment}  # each loser's hold released
    assert set(payments.count("capture")) == {stored.payment}
    assert await captures_due(world, sale_id) == 0


class MeanwhilePayments(RecordingPayments):
    """Runs `meanwhile` inside the first authorize, as a slow provider would let other requests
    run (a 3-D Secure step can take the buyer minutes)."""

    def __init__(self, meanwhile: Callable[[], Awaitable[None]]) -> None:
        super().__init__()
        self.meanwhile: Callable[[], Awaitable[None]] | None = meanwhile

    async def authorize(self, order_id: str, amount_cents: int, buyer_id: str) -> Authorization:
        auth = await super().authorize(order_id, amount_cents, buyer_id)
        if self.meanwhile is not None:
            run, self.meanwhile = self.meanwhile, None
            await run()
        return auth


async def settle_and_archive(world: World, stock: Stock, sale_id: str) -> None:
    assert await stock.end(sale_id, "host")
    persister = world.persister("archiving")
    for _ in range(3):  # the first read makes the consumer group
        await persister.drain(sale_id)
    assert await persister.settled(sale_id)
    await stock.archive(sale_id)


@pytest.mark.parametrize("same_reference", [True, False], ids=["same-hold", "other-hold"])
async def test_a_payment_overtaken_by_another_that_paid_and_was_archived_answers_paid(
        world: World, paying: Paying, same_reference: bool) -> None:
    """While the provider authorizes, another request pays the order, and the sale settles and is
    archived: the slow payment answers the paid order from SQL, and voids its hold only if that
    hold is not the one that paid (it used to void it, and answer 409 `expired`)."""
    service, stock, _, me, sale_id, order_id = paying
    other = world.orders(RecordingPayments() if same_reference else OnePerCallPayments(), stock=stock)

    async def paid_and_archived() -> None:
        assert (await other.pay(me, order_id)).status == "paid"
        await settle_and_archive(world, stock, sale_id)

    service._payments = slow = MeanwhilePayments(paid_and_archived)  # noqa: SLF001
    answer = await service.pay(me, order_id)
    assert answer.status == "paid" and answer.total_cents == 2500
    assert await stock.order(sale_id, order_id) is None  # answered from SQL
    (ref,) = slow.count("authorize")
    assert slow.count("void") == (Counter() if same_reference else Counter({ref: 1}))
    assert slow.count("capture") == Counter()  # the other request captured what paid


async def test_a_payment_overtaken_by_a_cancel_and_an_archive_voids_its_hold(world: World, paying: Paying) -> None:
    service, stock, _, me, sale_id, order_id = paying

    async def cancelled_and_archived() -> None:
        assert (await service.cancel(me, order_id)).status == "cancelled"
        await settle_and_archive(world, stock, sale_id)

    service._payments = slow = MeanwhilePayments(cancelled_and_archived)  # noqa: SLF001
    with pytest.raises(Conflict) as refused:
        await service.pay(me, order_id)
    assert refused.value.code == "cancelled"
    (ref,) = slow.count("authorize")
    assert slow.count("void") == Counter({ref: 1})


class HangingPayments(RecordingPayments):
    """A provider that never answers the calls named in `hangs` (or fails them, with `fails`)."""

    def __init__(self, hangs: frozenset[str] = frozenset(), fails: frozenset[str] = frozenset()) -> None:
        super().__init__()
        self.hangs, self.fails = hangs, fails

    async def _misbehave(self, call: str) -> None:
        if call in self.fails:
            raise ConnectionError("the provider is unreachable")
        if call in self.hangs:
            await asyncio.sleep(3600)

    async def authorize(self, order_id: str, amount_cents: int, buyer_id: str) -> Authorization:
        await self._misbehave("authorize")
        return await super().authorize(order_id, amount_cents, buyer_id)

    async def capture(self, auth: Authorization) -> None:
        await self._misbehave("capture")
        await super().capture(auth)

    async def void(self, auth: Authorization) -> None:
        await self._misbehave("void")
        await super().void(auth)


@pytest.fixture
def short_provider_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("server.inventory.orders.PROVIDER_TIMEOUT_S", 0.2)


@pytest.mark.parametrize("trouble", ["hangs", "fails"])
async def test_a_provider_that_hangs_or_fails_at_authorize_answers_503_and_leaves_the_order_reserved(
        paying: Paying, short_provider_timeout: None, trouble: str) -> None:
    service, stock, _, me, sale_id, order_id = paying
    service._payments = HangingPayments(**{trouble: frozenset({"authorize"})})  # noqa: SLF001
    async with asyncio.timeout(5):  # bounded by the provider timeout, not by the provider
        with pytest.raises(Unavailable) as refused:
            await service.pay(me, order_id)
    assert (refused.value.status, refused.value.code) == (503, "unavailable")
    assert refused.value.headers["Retry-After"]
    stored = await stock.order(sale_id, order_id)
    assert stored is not None and stored.status == "reserved"
    service._payments = RecordingPayments()  # noqa: SLF001  # the provider is back: the buyer's retry pays
    assert (await service.pay(me, order_id)).status == "paid"


async def test_a_capture_that_hangs_answers_the_paid_order_and_stays_owed(
        world: World, paying: Paying, short_provider_timeout: None) -> None:
    service, stock, _, me, sale_id, order_id = paying
    service._payments = HangingPayments(hangs=frozenset({"capture"}))  # noqa: SLF001
    async with asyncio.timeout(5):
        assert (await service.pay(me, order_id)).status == "paid"
    assert await captures_due(world, sale_id) == 1  # for the jobs process's late captures


async def test_a_void_that_hangs_does_not_hold_up_the_refusal(paying: Paying, short_provider_timeout: None) -> None:
    """The order is cancelled while the provider authorizes; voiding that hold hangs: the buyer
    gets the 409 all the same."""
    service, _, _, me, _, order_id = paying

    async def cancelled() -> None:
        assert (await service.cancel(me, order_id)).status == "cancelled"

    slow = MeanwhilePayments(cancelled)
    service._payments = slow  # noqa: SLF001

    async def hang(auth: Authorization) -> None:
        await asyncio.sleep(3600)
    slow.void = hang  # type: ignore[method-assign]
    async with asyncio.timeout(5):
        with pytest.raises(Conflict) as refused:
            await service.pay(me, order_id)
    assert refused.value.code == "cancelled"


async def test_a_payment_whose_order_is_gone_everywhere_voids_its_hold(world: World, paying: Paying) -> None:
    """While the provider authorizes, the order leaves Redis without reaching SQL (Redis lost its
    data): 404, and the hold it just made is released (it was kept)."""
    service, stock, _, me, sale_id, order_id = paying

    async def lost() -> None:
        await world.redis.hdel(keys.orders(sale_id), order_id)

    service._payments = slow = MeanwhilePayments(lost)  # noqa: SLF001
    with pytest.raises(NotFound):
        await service.pay(me, order_id)
    (ref,) = slow.count("authorize")
    assert slow.count("void") == Counter({ref: 1})


class UnreachableRooms:
    """The room layer, with Redis out of connections as a purchase tells the room."""

    async def tell(self, room_id: str, event: Any) -> None:
        raise RedisConnectionError("No connection available.")


async def test_a_reservation_is_answered_201_when_telling_the_room_fails(world: World) -> None:
    """The last unit's buyer got 503 `busy` for an order the script had made (telling the room of
    the sell-out found no free Redis connection): a load run counted it as never made."""
    sale = await world.add_sale(stock=1, limit=1)
    (buyer,) = await world.add_users(1)
    service = world.orders(rooms=cast(Any, UnreachableRooms()))
    me = Principal(buyer, "viewer", "buyer", "session", time.time() + 3600)
    status, order = await service.purchase(me, sale.sale_id, "k1", PurchaseIn(quantity=1), None)
    assert (status, order.status, order.remaining) == (201, "reserved", 0)
