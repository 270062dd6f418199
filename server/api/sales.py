"""Flash sales, purchases, orders and earnings over HTTP."""

from __future__ import annotations

from server import clock
from server.api.endpoint import Call, Router
from server.errors import BadRequest
from server.inventory import ledger
from server.inventory.schemas import EarningsOut, LedgerLine, OrderOut, PurchaseIn, SaleIn, SaleOut
from server.ratelimit import Gate, address_key

router = Router("sales")

# Purchases in flight per process before new ones are shed with 503 `busy`. A purchase in flight
# waits for one script in a shared pipelined batch (a thousand take the engine ~35 ms), so this
# can be high; much higher, and a new one would wait behind the others for longer than its buyer
# waits for an answer. At 256, a spike's first wave was mostly shed and came back as retries.
PURCHASE_GATE = Gate(1024)

MAX_KEY_LEN = 128


@router.endpoint("POST", "/api/rooms/{room_id}/sales", auth="host", body=SaleIn, response=SaleOut, status=201,
                 errors=(404, 409))
async def launch_sale(call: Call[SaleIn]) -> SaleOut:
    """Launch a flash sale of one of your products in your room; viewers get a `sale` event."""
    return await call.services.sales.launch(call.me, call.param("room_id"), call.body)


@router.endpoint("GET", "/api/rooms/{room_id}/sales", response=list[SaleOut], errors=(404,))
async def list_room_sales(call: Call[None]) -> list[SaleOut]:
    """The room's sales, newest first (at most 50)."""
    return await call.services.sales.of_room(call.param("room_id"))


@router.endpoint("GET", "/api/sales/{sale_id}", response=SaleOut, errors=(404,))
async def read_sale(call: Call[None]) -> SaleOut:
    """A sale with its live stock figures."""
    return await call.services.sales.get(call.param("sale_id"))


@router.endpoint("POST", "/api/sales/{sale_id}/end", auth="host", response=SaleOut, errors=(404,))
async def end_sale(call: Call[None]) -> SaleOut:
    """End your sale now; reserved orders may still be paid until their pay-by time."""
    return await call.services.sales.end(call.me, call.param("sale_id"))


@router.endpoint("POST", "/api/sales/{sale_id}/purchase", auth="user", body=PurchaseIn, response=OrderOut,
                 status=201, also_ok=(200,), errors=(404, 409, 429, 503),
                 headers=(("Idempotency-Key", "unique per order; send it again when you retry",
                           {"type": "string", "minLength": 1, "maxLength": MAX_KEY_LEN, "pattern": "^[ -~]+$"}),))
async def purchase(call: Call[PurchaseIn]) -> tuple[int, OrderOut]:
    """Reserve units (requires an Idempotency-Key header). 201 new order; 200 the same key again."""
    key = call.request.headers.get("idempotency-key", "").strip()
    if not key or len(key) > MAX_KEY_LEN or not (key.isascii() and key.isprintable()):
        raise BadRequest(f"send a unique Idempotency-Key header (1-{MAX_KEY_LEN} printable ASCII characters) and "
                         "reuse it when you retry", code="idempotency_key_required", field="Idempotency-Key")
    ip = call.request.client.host if call.request.client else "unknown"
    with PURCHASE_GATE:
        return await call.services.orders.purchase(
            call.me, call.param("sale_id"), key, call.body,
            None if ip in call.services.settings.rate_limit_exempt_ips else address_key(ip))


@router.endpoint("GET", "/api/orders", auth="user", response=list[OrderOut])
async def list_orders(call: Call[None]) -> list[OrderOut]:
    """Your orders, newest first (as persisted: a new order shows up within moments)."""
    return await call.services.orders.of_buyer(call.me)


@router.endpoint("GET", "/api/orders/{order_id}", auth="user", response=OrderOut, errors=(404,))
async def read_order(call: Call[None]) -> OrderOut:
    """One of your orders, live."""
    return await call.services.orders.get(call.me, call.param("order_id"))


@router.endpoint("POST", "/api/orders/{order_id}/pay", auth="user", response=OrderOut, errors=(402, 404, 409, 503))
async def pay_order(call: Call[None]) -> OrderOut:
    """Pay a reserved order before its pay-by time (409 `expired` after it)."""
    return await call.services.orders.pay(call.me, call.param("order_id"))


@router.endpoint("POST", "/api/orders/{order_id}/cancel", auth="user", response=OrderOut, errors=(404, 409))
async def cancel_order(call: Call[None]) -> OrderOut:
    """Cancel a reserved order; its units go back on sale."""
    return await call.services.orders.cancel(call.me, call.param("order_id"))


@router.endpoint("GET", "/api/me/earnings", auth="user", response=EarningsOut)
async def earnings(call: Call[None]) -> EarningsOut:
    """Your commission ledger: totals and the latest 200 entries."""
    async with call.services.db() as db:
        totals = await ledger.totals(db, call.me.user_id)
        lines = await ledger.entries(db, call.me.user_id)
    return EarningsOut(
        total_cents=sum(totals.values()), host_commission_cents=totals.get("host_commission", 0),
        referral_share_cents=totals.get("referral_share", 0),
        entries=[LedgerLine(order_id=e.order_id, sale_id=e.sale_id, room_id=e.room_id, kind=e.kind,  # type: ignore[arg-type]
                            amount_cents=e.amount_cents, created_at=clock.iso(e.created_at) or "")
                 for e in lines])
