"""Rate limits kept in Redis, so they hold across every app process."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from server.backends.lua import NOW_MS, Prelude, load_script
from server.backends.redis_client import RedisClient
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
# stay slow. It refills faster than one address may try (and holds more than two addresses' bursts).
# In front of it, one bucket per account and address; an address with no failures there may try
# even when the account's bucket is empty (login_guard.lua), so a crowd of addresses cannot keep
# the owner out either. Every try spends (so tries at once cannot all pass one check), and a
# right password gets its units back.
LOGIN_FAILS_PER_ACCOUNT = Limit("login-account", per_second=0.5, burst=30)
LOGIN_FAILS_PER_ACCOUNT_AND_ADDRESS = Limit("login-pair", per_second=0.1, burst=10)
LOGIN_CLEAN_AFTER_S = 900  # an address that tried an account this long ago counts as new to it
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
    def __init__(self, redis: RedisClient) -> None:
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


class LoginGuard:
    """The login limits of one account (login_guard.lua): spent before the password is checked,
    given back when it was right."""

    def __init__(self, redis: RedisClient) -> None:
        self._redis = redis
        self._script = load_script(redis, "server", "login_guard.lua", NOW_MS, GCRA)
        self._refund = load_script(redis, "server", "ratelimit.lua", NOW_MS, GCRA)

    @staticmethod
    def _keys(username: str, address: str) -> list[str]:
        tag = "{login:" + username + "}"
        return [f"rl:{tag}:account", f"rl:{tag}:from:{address}", f"rl:{tag}:tried:{address}"]

    async def attempt(self, username: str, address: str) -> bool:
        """Spend one try or raise 429; True if the account's own bucket was spent."""
        account, pair = LOGIN_FAILS_PER_ACCOUNT, LOGIN_FAILS_PER_ACCOUNT_AND_ADDRESS
        allowed, retry_ms, spent = await self._script(
            keys=self._keys(username, address),
            args=[account.interval_ms, account.burst, pair.interval_ms, pair.burst, LOGIN_CLEAN_AFTER_S * 1000])
        if not int(allowed):
            wait = int(retry_ms) / 1000.0
            raise TooManyRequests(f"too many failed logins; retry in {wait:.1f}s", retry_after_s=wait)
        return bool(int(spent))

    async def succeeded(self, username: str, address: str, account_spent: bool) -> None:
        """A right password: the owner's own logins never use up the buckets."""
        account_key, pair_key, mark = self._keys(username, address)
        pair = LOGIN_FAILS_PER_ACCOUNT_AND_ADDRESS
        await self._refund(keys=[pair_key], args=[pair.interval_ms, pair.burst, 1, "refund"])
        await self._redis.delete(mark)
        if account_spent:
            account = LOGIN_FAILS_PER_ACCOUNT
            await self._refund(keys=[account_key], args=[account.interval_ms, account.burst, 1, "refund"])
