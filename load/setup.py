"""Setting a scene up through the public API: host, room, product, sale, guests.

Everything goes through HTTP, as a real host and real viewers would do it, so a
run also exercises the setup paths and needs no access to the server's stores.
"""

from __future__ import annotations

import asyncio
import secrets
from dataclasses import dataclass
from typing import Any

from load.http import Pool, Response

EXEMPT_HINT = ("the server rate-limits sign-ups, guests and purchases per client address. Start the target "
               "server with LIVESALE_RATE_LIMIT_EXEMPT_IPS=127.0.0.1 (for example "
               "`LIVESALE_RATE_LIMIT_EXEMPT_IPS=127.0.0.1 livesale serve`) and run the load again.")


class SetupError(Exception):
    """The scene could not be set up; `hint` says what to do about it."""

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.hint = hint


def _expect(r: Response, status: int, what: str) -> Any:
    if r.status == 429:
        raise SetupError(f"{what}: 429 rate limited ({r.body[:200].decode(errors='replace')})", EXEMPT_HINT)
    if r.status != status:
        raise SetupError(f"{what}: expected {status}, got {r.status}: {r.body[:300].decode(errors='replace')}")
    return r.json()


@dataclass(frozen=True)
class Account:
    user_id: str
    token: str


@dataclass(frozen=True)
class Scene:
    host: Account
    room_id: str
    product_id: str


async def register_host(pool: Pool) -> Account:
    name = f"load-host-{secrets.token_hex(5)}"
    data = _expect(await pool.request("POST", "/api/auth/register", json={
        "username": name, "password": secrets.token_urlsafe(16), "role": "host"}), 201, "register host")
    return Account(data["user_id"], data["token"])


async def create_scene(pool: Pool, *, title: str = "Load test", price_cents: int = 999) -> Scene:
    """A host with a live room and a pinned product, ready for a sale."""
    host = await register_host(pool)
    room = _expect(await pool.request("POST", "/api/rooms", token=host.token, json={"title": title}),
                   201, "create room")
    _expect(await pool.request("POST", f"/api/rooms/{room['id']}/start", token=host.token), 200, "start room")
    product = _expect(await pool.request("POST", "/api/products", token=host.token, json={
        "name": "Load-test tea", "price_cents": price_cents, "commission_rate_bp": 2000}), 201, "create product")
    _expect(await pool.request("POST", f"/api/rooms/{room['id']}/pin", token=host.token,
                               json={"product_id": product["id"]}), 200, "pin product")
    return Scene(host, room["id"], product["id"])


async def launch_sale(pool: Pool, scene: Scene, *, stock: int, per_user_limit: int, starts_in_s: int,
                      duration_s: int, price_cents: int = 999, payment_timeout_s: int = 900) -> dict[str, Any]:
    sale: dict[str, Any] = _expect(await pool.request(
        "POST", f"/api/rooms/{scene.room_id}/sales", token=scene.host.token, json={
            "product_id": scene.product_id, "price_cents": price_cents, "stock": stock,
            "per_user_limit": per_user_limit, "duration_s": duration_s, "starts_in_s": starts_in_s,
            "payment_timeout_s": payment_timeout_s}), 201, "launch sale")
    return sale


async def get_sale(pool: Pool, sale_id: str) -> dict[str, Any]:
    sale: dict[str, Any] = _expect(await pool.request("GET", f"/api/sales/{sale_id}"), 200, "read sale")
    return sale


async def end_sale(pool: Pool, scene: Scene, sale_id: str) -> None:
    _expect(await pool.request("POST", f"/api/sales/{sale_id}/end", token=scene.host.token), 200, "end sale")


async def end_room(pool: Pool, scene: Scene) -> None:
    _expect(await pool.request("POST", f"/api/rooms/{scene.room_id}/end", token=scene.host.token), 200, "end room")


async def orders_of(pool: Pool, token: str) -> list[dict[str, Any]]:
    orders: list[dict[str, Any]] = _expect(await pool.request("GET", "/api/orders", token=token), 200, "list orders")
    return orders


async def create_guests(pool: Pool, n: int, prefix: str, *, concurrency: int = 16) -> list[Account]:
    """n guest accounts; a 429 stops at once with the exemption hint (the limit is per address)."""
    accounts: list[Account | None] = [None] * n
    next_index = 0

    async def one_by_one() -> None:
        nonlocal next_index
        while next_index < n:
            i, next_index = next_index, next_index + 1
            data = _expect(await pool.request("POST", "/api/auth/guest", json={"name": f"{prefix}{i}"}),
                           201, "create guest")
            accounts[i] = Account(data["user_id"], data["token"])

    workers = [asyncio.create_task(one_by_one()) for _ in range(min(concurrency, max(n, 1)))]
    try:
        await asyncio.gather(*workers)
    finally:
        for task in workers:
            task.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
    return [a for a in accounts if a is not None]
