"""`livesale reconcile`: connect to the configured Redis and database and compare one sale."""

from __future__ import annotations

from server.config import Settings
from server.db import make_engine, make_sessionmaker
from server.embedded_redis import EmbeddedRedis
from server.errors import ConfigError
from server.inventory.reconcile import Report, reconcile
from server.inventory.stock import Stock
from server.redis_pool import make_redis


async def run_reconcile(settings: Settings, sale_id: str) -> Report:
    url = settings.redis_url
    if url is None:
        # The embedded engine belongs to the running server; reach it through its socket.
        engine = EmbeddedRedis(settings.data_dir, binary=settings.redis_server_bin)
        if not engine.socket_path.exists():
            raise ConfigError("no REDIS_URL and no running embedded engine: start `livesale serve` first")
        url = engine.url
    redis = make_redis(url, 4)
    db_engine = make_engine(settings.database_url)
    stock = Stock(redis, settings.deployment)
    try:
        return await reconcile(stock, make_sessionmaker(db_engine), sale_id)
    finally:
        stock.disconnect()
        await redis.aclose(close_connection_pool=True)
        await db_engine.dispose()
