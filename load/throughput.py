"""Closed-loop HTTP throughput: C keep-alive connections, each sending its next
request as soon as the last one answered, for a fixed time after a warm-up.
The same loop drives the purchase endpoint and the bare baseline, so the ratio
compares servers, not clients."""

from __future__ import annotations

import asyncio
import multiprocessing
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from load.http import Connection, HttpError, Target
from load.runtime import raise_fd_limit, run
from load.stats import summary

# (connection index, sequence number) -> (method, path, body, headers)
RequestMaker = Callable[[int, int], tuple[str, str, bytes | None, dict[str, str]]]


@dataclass
class Tally:
    statuses: dict[int, int] = field(default_factory=dict)
    latencies_ms: list[float] = field(default_factory=list)  # of the requests answered 2xx
    errors: int = 0
    seconds: float = 0.0
    answered: int = 0  # every answered request, warm-up included (for CPU per request)

    def merge(self, other: Tally) -> None:
        for s, n in other.statuses.items():
            self.statuses[s] = self.statuses.get(s, 0) + n
        self.latencies_ms += other.latencies_ms
        self.errors += other.errors
        self.answered += other.answered
        self.seconds = max(self.seconds, other.seconds)

    @property
    def ok(self) -> int:
        return sum(n for s, n in self.statuses.items() if 200 <= s < 300)

    def figures(self) -> dict[str, object]:
        return {"requests_per_s": round(self.ok / self.seconds, 1) if self.seconds else 0.0,
                "ok": self.ok, "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
                "errors": self.errors, "seconds": round(self.seconds, 2), "latency_ms": summary(self.latencies_ms)}


async def closed_loop(url: str, make: RequestMaker, concurrency: int, seconds: float, warmup_s: float,
                      first_conn: int = 0) -> Tally:
    target = Target.parse(url)
    tally = Tally()
    start = time.monotonic()
    measure_from = start + warmup_s
    stop_at = measure_from + seconds

    async def one(ci: int) -> None:
        conn = Connection(target)
        seq = 0
        try:
            while True:
                t0 = time.monotonic()
                if t0 >= stop_at:
                    return
                method, path, body, headers = make(first_conn + ci, seq)
                seq += 1
                try:
                    r = await conn.request(method, path, body=body, headers=headers, timeout=10)
                except HttpError:
                    if t0 >= measure_from:
                        tally.errors += 1
                    await asyncio.sleep(0.05)
                    continue
                t1 = time.monotonic()
                tally.answered += 1
                if t0 >= measure_from and t1 <= stop_at:  # only requests wholly inside the window count
                    tally.statuses[r.status] = tally.statuses.get(r.status, 0) + 1
                    if 200 <= r.status < 300:
                        tally.latencies_ms.append((t1 - t0) * 1000)
        finally:
            await conn.close()

    await asyncio.gather(*(one(i) for i in range(concurrency)))
    tally.seconds = seconds
    return tally


def _child(url: str, make: RequestMaker, concurrency: int, seconds: float, warmup_s: float, first_conn: int,
           out: multiprocessing.queues.Queue[Tally]) -> None:
    raise_fd_limit()
    out.put(run(closed_loop(url, make, concurrency, seconds, warmup_s, first_conn)))


async def measure(url: str, make: RequestMaker, *, concurrency: int, seconds: float, warmup_s: float = 2.0,
                  procs: int = 1) -> Tally:
    """Run the loop in this process (procs=1) or split the connections over client processes."""
    if procs <= 1:
        return await closed_loop(url, make, concurrency, seconds, warmup_s)
    ctx = multiprocessing.get_context("spawn")
    out: multiprocessing.queues.Queue[Tally] = ctx.Queue()
    per = [concurrency // procs + (1 if i < concurrency % procs else 0) for i in range(procs)]
    children = []
    first = 0
    for n in per:
        p = ctx.Process(target=_child, args=(url, make, n, seconds, warmup_s, first, out), daemon=True)
        p.start()
        children.append(p)
        first += n
    total = Tally()
    try:
        for _ in children:
            total.merge(await asyncio.to_thread(out.get, True, warmup_s + seconds + 60))
    finally:
        for p in children:
            await asyncio.to_thread(p.join, 10)
            if p.is_alive():
                p.kill()
                await asyncio.to_thread(p.join, 5)
    return total
