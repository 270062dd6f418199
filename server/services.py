"""The long-lived objects a request handler may use, built once at start-up."""

from __future__ import annotations

from dataclasses import dataclass

from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from server.auth import Sessions
from server.config import Settings
from server.inventory.sales import SaleService
from server.ratelimit import PerAddress, RateLimiter
from server.rooms.hub import Hub
from server.rooms.service import RoomService


@dataclass
class Services:
    settings: Settings
    redis: Redis
    db_engine: AsyncEngine
    db: async_sessionmaker[AsyncSession]
    sessions: Sessions
    limiter: RateLimiter
    hub: Hub          # this process's connections
    sockets: PerAddress  # this process's room sockets per address
    rooms: RoomService  # room operations that reach every process
    sales: SaleService
