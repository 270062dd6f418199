"""Time is UTC everywhere; on the wire it is ISO 8601 with a Z, or epoch milliseconds."""

from __future__ import annotations

import functools
import time
from datetime import datetime, timezone


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def iso(dt: datetime | None) -> str | None:
    if dt is None:
        return None
    if dt.tzinfo is None:  # SQLite hands back naive datetimes; they were stored as UTC
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.astimezone(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def from_ms(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, timezone.utc)


def to_ms(dt: datetime) -> int:
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return int(dt.timestamp() * 1000)


def iso_ms(ms: int) -> str:
    """iso(from_ms(ms)), without building a datetime: on every purchase answer."""
    return f"{_second(ms // 1000)}.{ms % 1000:03d}Z"


@functools.lru_cache(maxsize=256)
def _second(s: int) -> str:
    # A purchase answer holds two times (created, pay-by): each second is formatted once.
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(s))
