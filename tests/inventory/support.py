"""Helpers for the flash-sale inventory tests (tests/inventory/).

Two ways in:
- over HTTP, against a real `livesale serve` (the session `server`, or private ServerProcess
  instances that always get stopped);
- in-process, for the scripts and the persister: a redis.asyncio client on a Redis database
  index that no test server watches, `Stock`, and a SQLite file of the test's own.

Each private server and the in-process tests use a Redis database index of their own (the
registry is in tests/support.py). Actors, the HTTP client, waiting and a server's backends are
tests/support.py's too.
"""

from __future__ import annotations

import asyncio
import random
import secrets
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Self, cast

import httpx
import msgspec
from redis.asyncio import Redis
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from server import clock
from server.backends.redis_client import make_redis
from server.backends.sql import create_schema, make_engine, make_sessionmaker
from server.ids import new_id
from server.inventory import keys
from server.inventory.notifier import SaleNotifier
from server.inventory.orders import Orders
from server.inventory.payments import PaymentProvider, SimulatedPayments
from server.inventory.persister import Entry, Persister
from server.inventory.reconcile import Report, reconcile
from server.inventory.records import Reservation, SaleInfo, SaleState, Terms
from server.inventory.schemas import SaleProduct
from server.inventory.stock import Stock, new_order_id
from server.inventory.tables import LedgerEntry, Order, Sale
from server.models import Product, Room, User
from server.rooms.publisher import Publisher
from server.rooms.service import BannedWords, RoomService
from server.rooms.store import RoomStore
from tests.support import (
    DB_IN_PROCESS,
    Actor,
    api_client,
    bearer,
    create_product,
    create_room,
    eventually,
    redis_db_url,
    register,
)

PERSIST_TIMEOUT_S = 15.0
# A restarted server claims what the killed one read but never acknowledged once it has been
# idle for persister.CLAIM_IDLE_MS (30 s), on a pass every CLAIM_EVERY_S (5 s).
RECOVERY_TIMEOUT_S = 60.0


def idem_key(prefix: str = "k") -> str:
    return f"{prefix}-{secrets.token_hex(8)}"


def error_of(r: httpx.Response) -> str | None:
    try:
        body = r.json()
    except ValueError:
        return None
    return body.get("error") if isinstance(body, dict) else None


# --- sales and orders over HTTP -------------------------------------------------------------

# Sales and orders the tests made over HTTP, by server URL: `settle_tracked` ends the sales and
# cancels the reservations at teardown, so that the persister closes them and the server's
# background loops stop polling them: the shared server keeps serving the rest of the session.
_TRACKED_SALES: dict[str, dict[str, str]] = {}   # base URL -> sale id -> host token
_TRACKED_ORDERS: dict[str, dict[str, str]] = {}  # base URL -> order id -> buyer token


def _url_key(url: Any) -> str:
    return str(url).rstrip("/")


def track_sale(client: httpx.AsyncClient, sale_id: str, host_token: str) -> None:
    _TRACKED_SALES.setdefault(_url_key(client.base_url), {})[sale_id] = host_token


def track_order(client: httpx.AsyncClient, order_id: str, buyer_token: str) -> None:
    _TRACKED_ORDERS.setdefault(_url_key(client.base_url), {})[order_id] = buyer_token


async def settle_tracked(base_url: str) -> None:
    """End every tracked sale of this server and cancel every tracked order still reserved."""
    sales = _TRACKED_SALES.pop(_url_key(base_url), {})
    orders = _TRACKED_ORDERS.pop(_url_key(base_url), {})
    if not sales and not orders:
        return
    async with api_client(base_url, connections=20) as client:
        sem = asyncio.Semaphore(20)

        async def post(path: str, token: str) -> None:
            async with sem:
                r = await client.post(path, headers=bearer(token))
                assert r.status_code in (200, 403, 404, 409), r.text  # 409: paid or expired already

        await asyncio.gather(*(post(f"/api/sales/{s}/end", t) for s, t in sales.items()))
        await asyncio.gather(*(post(f"/api/orders/{o}/cancel", t) for o, t in orders.items()))


@dataclass
class Shop:
    host: Actor
    room_id: str
    product_id: str
    products: dict[str, str] = field(default_factory=dict)  # name -> id


async def new_shop(client: httpx.AsyncClient, *, host: Actor | None = None, live: bool = True,
                   **product_fields: Any) -> Shop:
    """A host (registered) with a room (live unless told) and one product."""
    host = host or await register(client, "host")
    room_id = (await create_room(client, host, title="Flash room"))["id"]
    if live:
        r = await client.post(f"/api/rooms/{room_id}/start", headers=host.auth)
        assert r.status_code == 200, r.text
    product = await create_product(client, host, **{"name": "Flash tea", **product_fields})
    return Shop(host=host, room_id=room_id, product_id=product["id"])


def sale_body(shop: Shop, **fields: Any) -> dict[str, Any]:
    return {"product_id": shop.product_id, "price_cents": 1000, "stock": 10, "per_user_limit": 2,
            "duration_s": 600, **fields}


async def launch_raw(client: httpx.AsyncClient, shop: Shop, token: str | None = None, **fields: Any) -> httpx.Response:
    headers = bearer(token) if token is not None else shop.host.auth
    r = await client.post(f"/api/rooms/{shop.room_id}/sales", json=sale_body(shop, **fields), headers=headers)
    if r.status_code == 201:
        track_sale(client, r.json()["id"], shop.host.token)
    return r


async def launch(client: httpx.AsyncClient, shop: Shop, **fields: Any) -> dict[str, Any]:
    r = await launch_raw(client, shop, **fields)
    assert r.status_code == 201, r.text
    return dict(r.json())


async def end_sale(client: httpx.AsyncClient, shop: Shop, sale_id: str) -> dict[str, Any]:
    r = await client.post(f"/api/sales/{sale_id}/end", headers=shop.host.auth)
    assert r.status_code == 200, r.text
    return dict(r.json())


async def buy(client: httpx.AsyncClient, who: Actor, sale_id: str, key: str | None = None, *, quantity: int = 1,
              ref: str | None = None) -> httpx.Response:
    body: dict[str, Any] = {"quantity": quantity}
    if ref is not None:
        body["ref"] = ref
    headers = {**who.auth, "Idempotency-Key": key or idem_key()}
    r = await client.post(f"/api/sales/{sale_id}/purchase", json=body, headers=headers)
    if r.status_code in (200, 201):
        track_order(client, r.json()["order_id"], who.token)
    return r


async def buy_unlimited(client: httpx.AsyncClient, who: Actor, sale_id: str, key: str | None = None, *,
                        quantity: int = 1, ref: str | None = None) -> httpx.Response:
    """`buy`, retried (same key) while the per-buyer rate limit answers 429; bounded."""
    key = key or idem_key()
    for _ in range(50):
        r = await buy(client, who, sale_id, key, quantity=quantity, ref=ref)
        if r.status_code != 429:
            return r
        await asyncio.sleep(0.1)
    raise AssertionError(f"still rate limited: {r.text}")


async def bought(client: httpx.AsyncClient, who: Actor, sale_id: str, *, quantity: int = 1,
                 ref: str | None = None) -> dict[str, Any]:
    r = await buy(client, who, sale_id, quantity=quantity, ref=ref)
    assert r.status_code == 201, r.text
    return dict(r.json())


async def pay(client: httpx.AsyncClient, who: Actor, order_id: str) -> httpx.Response:
    return await client.post(f"/api/orders/{order_id}/pay", headers=who.auth)


async def paid(client: httpx.AsyncClient, who: Actor, order_id: str) -> dict[str, Any]:
    r = await pay(client, who, order_id)
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "paid", r.text
    return dict(r.json())


async def get_sale(client: httpx.AsyncClient, sale_id: str) -> dict[str, Any]:
    r = await client.get(f"/api/sales/{sale_id}")
    assert r.status_code == 200, r.text
    return dict(r.json())


async def get_order(client: httpx.AsyncClient, who: Actor, order_id: str) -> dict[str, Any]:
    r = await client.get(f"/api/orders/{order_id}", headers=who.auth)
    assert r.status_code == 200, r.text
    return dict(r.json())


def assert_balanced(sale: dict[str, Any]) -> None:
    """The stock invariant as GET /api/sales/{id} shows it."""
    assert sale["remaining"] >= 0, sale
    assert sale["remaining"] + sale["reserved"] + sale["paid"] == sale["stock"], sale
    assert sale["sold"] == sale["reserved"] + sale["paid"], sale


# --- spikes ----------------------------------------------------------------------------------

class ClientPool:
    """Many AsyncClients sharing the load of a spike. One httpx client's pool bookkeeping grows with
    the requests queued on it (a thousand at once cost more client CPU than the server spends on
    them), so the connections are spread over several clients: `clients * connections` in all."""

    def __init__(self, base_url: str, *, clients: int = 25, connections: int = 40) -> None:
        self.base_url = base_url
        self.clients = [api_client(base_url, connections=connections) for _ in range(clients)]

    def __getitem__(self, i: int) -> httpx.AsyncClient:
        return self.clients[i % len(self.clients)]

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.gather(*(c.aclose() for c in self.clients))


@dataclass
class Attempt:
    """One purchase attempt (a buyer and an Idempotency-Key) and every answer it got."""
    buyer: Actor
    key: str
    quantity: int = 1
    answers: list[httpx.Response] = field(default_factory=list)
    errors: list[BaseException] = field(default_factory=list)  # transport failures (no answer)

    @property
    def final(self) -> httpx.Response | None:
        return self.answers[-1] if self.answers else None

    @property
    def order_id(self) -> str | None:
        r = self.final
        return str(r.json()["order_id"]) if r is not None and r.status_code in (200, 201) else None


TRANSPORT_RETRIES = 8  # a dropped connection is retried with the same key, as a client should
BUSY_RETRIES = 40  # so is a 503 (`busy`: the server sheds load; `unavailable`), after Retry-After


async def fire(pool: ClientPool, sale_id: str, attempts: list[Attempt], *, crash: bool = False,
               on_answer: Callable[[Attempt], None] | None = None, spread_s: float = 0.0) -> None:
    """Send every attempt at once (all wait on one gate). A 503 (the server sheds load past a
    number of purchases in flight) is retried after its Retry-After, with a little jitter, and
    a transport failure (a dropped keep-alive connection under load) at once, both with the same
    key, as the API asks clients to; with `crash`, a transport failure ends the attempt (the
    server is gone). Bounded either way. With `spread_s`, each attempt starts at a random moment
    of that many seconds after the gate: a sustained load rather than one burst."""
    gate = asyncio.Event()
    rng = random.Random(len(attempts))

    async def one(i: int, a: Attempt) -> None:
        client = pool[i]
        delay = rng.uniform(0, spread_s) if spread_s else 0.0
        await gate.wait()
        if delay:
            await asyncio.sleep(delay)
        for _ in range(BUSY_RETRIES):
            try:
                r = await client.post(f"/api/sales/{sale_id}/purchase", json={"quantity": a.quantity},
                                      headers={**a.buyer.auth, "Idempotency-Key": a.key})
            except httpx.TransportError as exc:
                a.errors.append(exc)
                if crash or len(a.errors) >= TRANSPORT_RETRIES:
                    return
                await asyncio.sleep(0.2)
                continue
            a.answers.append(r)
            if r.status_code in (200, 201):
                track_order(client, r.json()["order_id"], a.buyer.token)
            if on_answer is not None:
                on_answer(a)
            if r.status_code != 503:
                return
            await asyncio.sleep(float(r.headers.get("retry-after", "1")) * rng.uniform(0.5, 1.5))

    tasks = [asyncio.create_task(one(i, a)) for i, a in enumerate(attempts)]
    await asyncio.sleep(0)
    gate.set()
    await asyncio.gather(*tasks)


ATTEMPTS_PER_BUYER = 4  # distinct keys, fired together
RETRY_EVERY = 5  # every 5th buyer also re-sends its first key at the same moment (a client's retry)


def plan(buyers: list[Any]) -> list[Attempt]:
    attempts: list[Attempt] = []
    for i, buyer in enumerate(buyers):
        mine = [Attempt(buyer, idem_key(f"b{i}a{j}")) for j in range(ATTEMPTS_PER_BUYER)]
        attempts += mine
        if i % RETRY_EVERY == 0:
            attempts.append(Attempt(buyer, mine[0].key))  # the same key, at the same moment
    return attempts


def check_answers(attempts: list[Attempt], stock: int, limit: int) -> dict[str, str]:
    """Every answer is an order or an expected refusal; one order per (buyer, key); nothing oversold.
    Returns order id -> buyer id."""
    finals: Counter[Any] = Counter()
    retried = 0  # tries that got a 503 or no answer at all, then were sent again with the same key
    for a in attempts:
        assert a.final is not None, (a.key, a.errors)
        for r in a.answers[:-1]:
            assert r.status_code == 503 and error_of(r) in ("busy", "unavailable"), r.text
        retried += len(a.answers) - 1 + len(a.errors)
        r = a.final
        code = error_of(r) if r.status_code >= 400 else ""
        finals[(r.status_code, code)] += 1
        if r.status_code in (200, 201):
            body = r.json()
            assert body["status"] == "reserved" and body["quantity"] == a.quantity, r.text
        elif r.status_code == 409:
            assert code in ("sold_out", "limit_exceeded"), r.text
        else:
            assert r.status_code == 429 and code == "rate_limited", r.text

    # One order per (buyer, key), whatever the number of times it was sent.
    by_key: dict[tuple[str, str], set[str]] = defaultdict(set)
    created: Counter[str] = Counter()
    owner: dict[str, str] = {}
    for a in attempts:
        for r in a.answers:
            if r.status_code in (200, 201):
                order_id = r.json()["order_id"]
                by_key[(a.buyer.user_id, a.key)].add(order_id)
                assert owner.setdefault(order_id, a.buyer.user_id) == a.buyer.user_id, "an order for two buyers"
                if r.status_code == 201:
                    created[order_id] += 1
    for key, ids in by_key.items():
        assert len(ids) == 1, f"key {key} made orders {ids}"
    assert all(n == 1 for n in created.values()), "an order was created (201) twice"
    orders = set(owner)
    assert len(orders) == len(by_key)
    # Exactly the stock went out, in units of 1. Without retries every order was answered 201 once;
    # a reservation whose answer was lost (503 or dropped connection) is answered 200 on the retry.
    assert len(orders) == stock, dict(finals)
    if retried == 0:
        assert sum(created.values()) == stock, dict(finals)
    per_buyer = Counter(owner.values())
    assert max(per_buyer.values()) <= limit, per_buyer.most_common(3)
    return owner


# --- what a sale left in Redis and SQL -----------------------------------------------------------

async def wait_persisted(stock: Stock, db: async_sessionmaker[AsyncSession], sale_id: str, *,
                         timeout: float = PERSIST_TIMEOUT_S) -> Report:
    """Poll reconcile until every stream entry of the sale is in SQL; return that report."""
    async def caught_up() -> Report | None:
        report = await reconcile(stock, db, sale_id)
        return report if report.unpersisted == 0 else None

    report: Report = await eventually(caught_up, timeout=timeout, what=f"persister caught up on {sale_id}")
    return report


async def sql_orders(db: async_sessionmaker[AsyncSession], sale_id: str) -> dict[str, Order]:
    async with db() as session:
        rows = (await session.scalars(select(Order).where(Order.sale_id == sale_id))).all()
    return {r.id: r for r in rows}


async def sql_ledger(db: async_sessionmaker[AsyncSession], sale_id: str) -> list[LedgerEntry]:
    async with db() as session:
        return list((await session.scalars(select(LedgerEntry).where(LedgerEntry.sale_id == sale_id))).all())


async def sql_count(db: async_sessionmaker[AsyncSession], model: Any, *where: Any) -> int:
    async with db() as session:
        return int(await session.scalar(select(func.count()).select_from(model).where(*where)) or 0)


async def pending(stock: Stock, sale_id: str) -> int:
    info = await stock.redis.xpending(keys.log(sale_id), stock.group)
    return int(info["pending"])


async def stream_entries(redis: Redis, sale_id: str) -> list[Entry]:
    """The sale's whole stream, as the persister reads entries."""
    return cast(list[Entry], await redis.xrange(keys.log(sale_id)))


async def stream_records(redis: Redis, sale_id: str) -> list[dict[str, Any]]:
    """Every order record the sale's stream holds, in order (JSON decoded)."""
    return [msgspec.json.decode(fields[b"order"]) for _, fields in await stream_entries(redis, sale_id)
            if b"order" in fields]


async def hash_ints(redis: Redis, key: str) -> dict[str, int]:
    raw = cast(dict[bytes, bytes], await redis.hgetall(key))
    return {k.decode(): int(v) for k, v in raw.items()}


async def zset_members(redis: Redis, key: str) -> set[str]:
    return {m.decode() for m in cast(list[bytes], await redis.zrange(key, 0, -1))}


async def sale_state(stock: Stock, sale_id: str) -> SaleState:
    """The sale's hash, which must be there."""
    state = await stock.state(sale_id)
    assert state is not None, f"sale {sale_id} is not in Redis"
    return state


async def redis_now_ms(redis: Redis) -> int:
    sec, usec = await redis.time()
    return int(sec) * 1000 + int(usec) // 1000


# --- in-process world --------------------------------------------------------------------------

@dataclass
class InProcSale:
    sale_id: str
    room_id: str
    host_id: str
    stock: int
    limit: int
    price_cents: int
    commission_rate_bp: int


class World:
    """Real Redis (its own database index) + Stock + a SQL database (a SQLite file, or a URL), in-process."""

    def __init__(self, redis: Redis, engine: AsyncEngine) -> None:
        self.redis = redis
        self.stock = Stock(redis, f"world-{secrets.token_hex(4)}")
        self.engine = engine
        self.db = make_sessionmaker(engine)

    @classmethod
    @asynccontextmanager
    async def open(cls, redis_url: str, database: Path | str, db_index: int = DB_IN_PROCESS) -> AsyncIterator[World]:
        engine = make_engine(database if isinstance(database, str) else f"sqlite+aiosqlite:///{database}")
        redis = make_redis(redis_db_url(redis_url, db_index), 64)
        world: World | None = None
        try:
            await create_schema(engine)
            world = cls(redis, engine)
            yield world
        finally:
            if world is not None:
                world.stock.disconnect()
            await redis.aclose(close_connection_pool=True)
            await engine.dispose()

    async def room_service(self) -> RoomService:
        publisher = await Publisher.detect(self.redis)
        store = RoomStore(self.redis, publisher)
        return RoomService(store, publisher, BannedWords(store))

    def orders(self, payments: PaymentProvider | None = None, *, stock: Stock | None = None,
               rooms: RoomService | None = None) -> Orders:
        """The buying service on this world (its room events go nowhere unless `rooms` is given)."""
        stock = stock or self.stock
        rooms = rooms or cast(RoomService, None)
        return Orders(stock, self.db, payments or SimulatedPayments(), SaleNotifier(stock, rooms), rooms)

    def persister(self, consumer: str, claim_idle_ms: int = 0) -> Persister:
        return Persister(self.redis, self.stock, self.db, consumer=consumer, claim_idle_ms=claim_idle_ms)

    async def add_users(self, n: int, role: str = "viewer") -> list[str]:
        ids = [new_id("usr") for _ in range(n)]
        async with self.db.begin() as session:
            for uid in ids:
                session.add(User(id=uid, username=f"u-{uid}", name=uid[-6:], role=role, password_hash=None))
        return ids

    async def add_sale(self, *, stock: int = 10, limit: int = 2, price_cents: int = 1000,
                       commission_rate_bp: int = 2000, timeout_ms: int = 3_600_000,
                       platform_fee_bp: int = 500, referral_share_bp: int = 1000) -> InProcSale:
        """A host, room, product and sale in SQL, and the sale in Redis, running from now for an hour."""
        (host_id,) = await self.add_users(1, role="host")
        now = clock.utcnow()
        room = Room(id=new_id("room"), host_id=host_id, title="in-process", status="live")
        product = Product(id=new_id("prd"), host_id=host_id, name="thing", description="", image_url=None,
                          price_cents=price_cents, commission_rate_bp=commission_rate_bp)
        sale = Sale(id=new_id("sale"), room_id=room.id, product_id=product.id, host_id=host_id,
                    price_cents=price_cents, stock=stock, per_user_limit=limit,
                    commission_rate_bp=commission_rate_bp, platform_fee_bp=platform_fee_bp,
                    referral_share_bp=referral_share_bp, starts_at=now - timedelta(seconds=5),
                    ends_at=now + timedelta(hours=1), payment_timeout_s=max(1, timeout_ms // 1000))
        async with self.db.begin() as session:
            session.add_all([room, product])
            await session.flush()
            session.add(sale)
        await self.stock.create(Terms(
            sale_id=sale.id, room_id=room.id, stock=stock, per_user_limit=limit, price_cents=price_cents,
            starts_at_ms=clock.to_ms(sale.starts_at), ends_at_ms=clock.to_ms(sale.ends_at),
            payment_timeout_ms=timeout_ms,
            info=SaleInfo(product=SaleProduct(id=product.id, name="thing", description="", image_url=None,
                                              list_price_cents=price_cents))))
        return InProcSale(sale.id, room.id, host_id, stock, limit, price_cents, commission_rate_bp)

    async def reserve(self, sale_id: str, user_id: str, key: str | None = None, quantity: int = 1,
                      ref: str | None = None) -> Reservation:
        return await self.stock.reserve(sale_id, user_id, key or idem_key(), new_order_id(sale_id), quantity, ref)

    async def wait_redis_past(self, ms: int) -> None:
        """Until the Redis clock (the one the scripts read) is past `ms`."""
        async def past() -> bool:
            return await redis_now_ms(self.redis) > ms

        await eventually(past, timeout=10, interval=0.01, what=f"Redis clock past {ms}")

