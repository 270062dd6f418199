"""Rate limits kept in Redis, so they hold across every app process."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from redis.asyncio import Redis

from server.backends.lua import NOW_MS, Prelude, load_script
from server.errors import TooManyRequests, Unavailable

# The GCRA functions (gcra.lua): a prelude of every script that rate-limits, so that every limit
# in the product is the same arithmetic.
GCRA: Prelude = ("server", "gcra.lua")


@dataclass(frozen=True)
class Limit:
    name: str
    per_second: float
    burst: int

    @property
    def interval_ms(self) -> float:
        return 1000.0 / self.per_second


# The limits of the product, in one place (see docs/reliability.md).
CHAT = Limit("chat", per_second=2, burst=5)  # per user and room (chat_post.lua)
LOGIN_PER_IP = Limit("login-ip", per_second=0.2, burst=10)  # slow brute force: 12 a minute after a burst
# Failed logins per account, whatever the addresses: guesses at one password from many machines
# stay slow. It refills faster than one address may try (and holds more than two addresses' bursts),
# so nobody can keep an owner out from one or two addresses. Every try spends (so tries at once
# cannot all pass one check), and a right password gets its unit back.
LOGIN_FAILS_PER_ACCOUNT = Limit("login-account", per_second=0.5, burst=30)
REGISTER_PER_IP = Limit("register-ip", per_second=0.5, burst=20)
PURCHASE_PER_USER = Limit("buy-user", per_second=5, burst=10)
PURCHASE_PER_IP = Limit("buy-ip", per_second=200, burst=400)  # many buyers may share one NAT


def address_key(ip: str) -> str:
    """The subject of a per-address limit: an IPv4 address, or an IPv6 address's /64 (one
    subscriber's network: the 2^64 addresses in it are one client's to choose from)."""
    if ":" not in ip:  # IPv4 (or no address at all): as it is, without parsing on every purchase
        return ip
    try:
        address = ipaddress.IPv6Address(ip)
    except ValueError:
        return ip
    if address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(ipaddress.ip_network(f"{address}/64", strict=False))


class Gate:
    """Load shedding: at most `limit` calls in flight in this process; past that, answer
    503 at once. Under a spike a fast "busy, retry" beats a slow answer the client has
    stopped waiting for (and whose retry would pile on)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.inflight = 0

    def __enter__(self) -> None:
        if self.inflight >= self.limit:
            raise Unavailable("too busy right now; retry in a moment", code="busy", headers={"Retry-After": "1"})
        self.inflight += 1

    def __exit__(self, *exc: object) -> None:
        self.inflight -= 1


class PerAddress:
    """At most `limit` open things (room sockets) per address in this process; counted here,
    not in Redis, so that a process that dies takes its counts with it."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.open: dict[str, int] = {}

    def take(self, address: str) -> bool:
        held = self.open.get(address, 0)
        if held >= self.limit:
            return False
        self.open[address] = held + 1
        return True

    def give_back(self, address: str) -> None:
        held = self.open[address] - 1
        if held:
            self.open[address] = held
        else:
            del self.open[address]


class RateLimiter:
    def __init__(self, redis: Redis) -> None:
        self._script = load_script(redis, "server", "ratelimit.lua", NOW_MS, GCRA)

    async def _run(self, limit: Limit, subject: str, cost: int, mode: str) -> tuple[int, int]:
        allowed, retry_ms = await self._script(keys=[f"rl:{limit.name}:{subject}"],
                                               args=[limit.interval_ms, limit.burst, cost, mode])
        return int(allowed), int(retry_ms)

    async def hit(self, limit: Limit, subject: str, cost: int = 1) -> float:
        """Spend `cost` units; return 0 if allowed, else the seconds to wait."""
        allowed, retry_ms = await self._run(limit, subject, cost, "")
        return 0.0 if allowed else retry_ms / 1000.0

    async def check(self, limit: Limit, subject: str, cost: int = 1) -> None:
        """Spend units or raise 429 with Retry-After."""
        wait = await self.hit(limit, subject, cost)
        if wait:
            raise TooManyRequests(f"too many requests ({limit.name}); retry in {wait:.1f}s", retry_after_s=wait)

    async def refund(self, limit: Limit, subject: str, cost: int = 1) -> None:
        """Give back units spent by an attempt that turned out not to count."""
        await self._run(limit, subject, cost, "refund")
