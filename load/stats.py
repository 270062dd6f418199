"""Percentiles: exact ones over raw samples, and a mergeable log histogram for
streams too large to ship between processes (danmaku deliveries)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

# 1% wide buckets: percentiles within 1% of the exact value, whatever the range.
_GROWTH = 1.01
_LOG_GROWTH = math.log(_GROWTH)
_FLOOR_MS = 0.01  # anything faster is counted here


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted sequence (q in 0..100)."""
    if not sorted_values:
        return float("nan")
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return float(sorted_values[min(rank, len(sorted_values)) - 1])


def summary(values: Iterable[float]) -> dict[str, float | int]:
    """count, p50, p95, p99, max (ms, rounded for the report)."""
    data = sorted(values)
    if not data:
        return {"count": 0}
    return {"count": len(data), "p50": round(percentile(data, 50), 2), "p95": round(percentile(data, 95), 2),
            "p99": round(percentile(data, 99), 2), "max": round(data[-1], 2)}


@dataclass
class Histogram:
    """Counts per 1%-wide bucket of milliseconds; merging is adding counts."""
    buckets: dict[int, int] = field(default_factory=dict)
    count: int = 0
    max: float = 0.0

    def add(self, ms: float) -> None:
        index = 0 if ms <= _FLOOR_MS else int(math.log(ms / _FLOOR_MS) / _LOG_GROWTH) + 1
        self.buckets[index] = self.buckets.get(index, 0) + 1
        self.count += 1
        self.max = max(self.max, ms)

    def merge(self, other: Histogram) -> None:
        for index, n in other.buckets.items():
            self.buckets[index] = self.buckets.get(index, 0) + n
        self.count += other.count
        self.max = max(self.max, other.max)

    def percentile(self, q: float) -> float:
        if not self.count:
            return float("nan")
        rank = max(1, math.ceil(q / 100 * self.count))
        seen = 0
        for index in sorted(self.buckets):
            seen += self.buckets[index]
            if seen >= rank:
                # The bucket's upper edge, capped by the largest value seen.
                return min(self.max, _FLOOR_MS * _GROWTH ** index)
        return self.max

    def summary(self) -> dict[str, float | int]:
        if not self.count:
            return {"count": 0}
        return {"count": self.count, "p50": round(self.percentile(50), 2), "p95": round(self.percentile(95), 2),
                "p99": round(self.percentile(99), 2), "max": round(self.max, 2)}


def spread(values: Sequence[int | float]) -> dict[str, float]:
    """min / mean / max of a list of per-viewer figures."""
    if not values:
        return {"min": 0, "mean": 0, "max": 0}
    return {"min": min(values), "mean": round(sum(values) / len(values), 1), "max": max(values)}
