"""server.config.load_settings: the secret key kept in the data dir, and casting of every setting."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from sqlalchemy import text

from server.backends.sql import create_schema, make_engine
from server.config import load_settings
from server.errors import ConfigError
from tests.postgres import Postgres


def env_for(data_dir: Path, **extra: str) -> dict[str, str]:
    return {"LIVESALE_DATA_DIR": str(data_dir), **extra}


def test_defaults(data_dir: Path) -> None:
    settings = load_settings(env_for(data_dir))
    assert settings.data_dir == data_dir.resolve()
    assert data_dir.is_dir()
    assert settings.redis_url is None
    assert settings.database_url == f"sqlite+aiosqlite:///{data_dir.resolve() / 'livesale.db'}"
    assert settings.allowed_origins == ()
    assert settings.token_ttl_s == 7 * 24 * 3600
    assert settings.cookie_secure is False
    assert settings.background_jobs is True


async def test_the_data_dir_and_the_default_database_are_readable_by_their_owner_only(data_dir: Path) -> None:
    """They hold the password hashes, the orders and the ledger (under umask 022 they were 0755
    and 0644: any local user could read them)."""
    settings = load_settings(env_for(data_dir))
    engine = make_engine(settings.database_url)
    try:
        await create_schema(engine)
    finally:
        await engine.dispose()
    assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700
    files = [f for f in data_dir.iterdir() if f.name.startswith("livesale.db")]
    assert files and {f.name: stat.S_IMODE(f.stat().st_mode) for f in files} == {f.name: 0o600 for f in files}


def test_secret_key_is_generated_once_and_kept(data_dir: Path) -> None:
    first = load_settings(env_for(data_dir)).secret_key
    path = data_dir / "secret_key"
    assert len(first) >= 32
    assert path.read_text().strip() == first
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_settings(env_for(data_dir)).secret_key == first
    assert load_settings(env_for(data_dir, LIVESALE_SECRET_KEY="")).secret_key == first
    assert [p.name for p in data_dir.iterdir()] == ["secret_key"]


def test_each_data_dir_gets_its_own_key(tmp_path: Path) -> None:
    a = load_settings(env_for(tmp_path / "a")).secret_key
    b = load_settings(env_for(tmp_path / "b")).secret_key
    assert a != b


def test_given_secret_key_is_used_and_not_stored(data_dir: Path) -> None:
    key = "s" * 32
    assert load_settings(env_for(data_dir, LIVESALE_SECRET_KEY=key)).secret_key == key
    assert not (data_dir / "secret_key").exists()


@pytest.mark.parametrize("key", ["short", "x" * 31])
def test_short_secret_key_is_a_config_error(data_dir: Path, key: str) -> None:
    with pytest.raises(ConfigError, match="LIVESALE_SECRET_KEY"):
        load_settings(env_for(data_dir, LIVESALE_SECRET_KEY=key))


@pytest.mark.parametrize("content", ["", "\n", "tiny"])
def test_empty_or_short_secret_key_file_is_refused(data_dir: Path, content: str) -> None:
    data_dir.mkdir(parents=True)
    (data_dir / "secret_key").write_text(content)
    try:
        key = load_settings(env_for(data_dir)).secret_key
    except ConfigError:
        return
    assert len(key) >= 32


def test_redis_and_database_urls(data_dir: Path) -> None:
    settings = load_settings(env_for(data_dir, REDIS_URL="redis://127.0.0.1:6390/2",
                                     DATABASE_URL="postgres://u:p@db.internal:5432/livesale"))
    assert settings.redis_url == "redis://127.0.0.1:6390/2"
    assert settings.database_url == "postgresql+asyncpg://u:p@db.internal:5432/livesale"
    plain = load_settings(env_for(data_dir, DATABASE_URL="postgresql://db/x")).database_url
    assert plain == "postgresql+asyncpg://db/x"
    given = load_settings(env_for(data_dir, DATABASE_URL="sqlite+aiosqlite:///elsewhere.db")).database_url
    assert given == "sqlite+aiosqlite:///elsewhere.db"


def test_allowed_origins_list(data_dir: Path) -> None:
    raw = " https://app.example.com , ,http://localhost:3000,"
    settings = load_settings(env_for(data_dir, LIVESALE_ALLOWED_ORIGINS=raw))
    assert settings.allowed_origins == ("https://app.example.com", "http://localhost:3000")


@pytest.mark.parametrize(("raw", "expected"), [("1", True), ("TRUE", True), (" yes ", True), ("on", True),
                                               ("0", False), ("false", False), ("No", False), ("off", False),
                                               ("", False)])
def test_boolean_settings(data_dir: Path, raw: str, expected: bool) -> None:
    assert load_settings(env_for(data_dir, LIVESALE_COOKIE_SECURE=raw)).cookie_secure is expected


def test_bad_boolean_is_a_config_error(data_dir: Path) -> None:
    with pytest.raises(ConfigError, match="LIVESALE_COOKIE_SECURE"):
        load_settings(env_for(data_dir, LIVESALE_COOKIE_SECURE="maybe"))


def test_integer_settings(data_dir: Path) -> None:
    settings = load_settings(env_for(data_dir, LIVESALE_TOKEN_TTL_S="3600", LIVESALE_PLATFORM_FEE_BP="0",
                                     LIVESALE_REFERRAL_SHARE_BP="10000", LIVESALE_REDIS_MAX_CONNECTIONS="8"))
    assert (settings.token_ttl_s, settings.platform_fee_bp, settings.referral_share_bp,
            settings.redis_max_connections) == (3600, 0, 10_000, 8)


@pytest.mark.parametrize(("name", "raw"), [
    ("LIVESALE_TOKEN_TTL_S", "59"),
    ("LIVESALE_TOKEN_TTL_S", "1h"),
    ("LIVESALE_TOKEN_TTL_S", str(365 * 24 * 3600 + 1)),
    ("LIVESALE_PLATFORM_FEE_BP", "10001"),
    ("LIVESALE_PLATFORM_FEE_BP", "-1"),
    ("LIVESALE_REFERRAL_SHARE_BP", "2.5"),
    ("LIVESALE_REDIS_MAX_CONNECTIONS", "1"),
])
def test_bad_integer_is_a_config_error(data_dir: Path, name: str, raw: str) -> None:
    with pytest.raises(ConfigError, match=name):
        load_settings(env_for(data_dir, **{name: raw}))


async def test_a_libpq_database_url_with_its_usual_options_connects(postgres: Postgres, data_dir: Path) -> None:
    """`postgresql://...?sslmode=...&connect_timeout=...&application_name=...`, as managed databases
    hand them out: asyncpg takes none of these names (it refused them with a TypeError); and
    SQLAlchemy's own `prepared_statement_cache_size` (0 behind pgbouncer) still reaches SQLAlchemy."""
    created = (await postgres.new_database()).replace("postgresql+asyncpg://", "postgresql://")
    url = load_settings(env_for(data_dir, DATABASE_URL=created + "?sslmode=disable&connect_timeout=0"
                                "&application_name=livesale-test&prepared_statement_cache_size=0")).database_url
    engine = make_engine(url)
    try:
        async with engine.connect() as conn:
            assert await conn.scalar(text("SELECT current_setting('application_name')")) == "livesale-test"
    finally:
        await engine.dispose()
