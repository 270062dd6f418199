"""`load bench`: the stack measured against its own baselines, in one run on one machine.

- purchase throughput and p99 vs a bare Starlette JSON endpoint (the HTTP stack's ceiling);
- the reserve script on the engine vs a bare INCR (the engine's ceiling);
- broadcast deliveries per second, delivery p99 and server memory per idle viewer;
- purchase throughput with 2 server workers vs 1.

The machine is shared and noisy: the ratios are the result, absolute numbers are context.
"""

from __future__ import annotations

import json
import secrets
import shutil
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from load.broadcast import broadcast_run
from load.fleet import RunError
from load.http import Pool
from load.machine import describe
from load.redisbench import SALES, cluster_bench, engine_bench
from load.servers import Served, baseline, livesale
from load.setup import SetupError, create_guests, create_scene, launch_sale
from load.throughput import RequestMaker, measure

MEMORY_TARGET_KIB = 50.0      # per idle viewer


@dataclass(frozen=True)
class BenchConfig:
    seconds: float = 10.0
    concurrency: int = 64
    procs: int = 1
    redis_ops: int = 200_000
    viewers: list[int] = field(default_factory=lambda: [1000, 5000])
    chat_rate: float = 20.0
    only: set[str] = field(default_factory=set)
    out: Path = Path(".")
    users: int = 1500         # buyers for the purchase runs: keeps each under 5 purchases/s and 100 units
    repeat: int = 1           # HTTP runs per server, alternating; the median is reported
    warmup_s: float = 2.0

    def wants(self, part: str) -> bool:
        return not self.only or part in self.only


class BareBuy:
    """The baseline's request: the same headers and body as a purchase."""

    def __init__(self, token_len: int = 150) -> None:
        self.auth = "Bearer " + "t" * token_len

    def __call__(self, conn: int, seq: int) -> tuple[str, str, bytes | None, dict[str, str]]:
        return ("POST", "/api/sales/sale_bench/purchase", b'{"quantity":1}',
                {"Authorization": self.auth, "Idempotency-Key": f"{conn}-{seq}-{secrets.token_hex(6)}"})


class Purchase:
    """Round-robin over many buyers, so the per-buyer limits (5/s, the sale's 100 units) do not bind."""

    def __init__(self, sale_id: str, tokens: list[str], concurrency: int) -> None:
        self.path = f"/api/sales/{sale_id}/purchase"
        self.auth = ["Bearer " + t for t in tokens]
        self.concurrency = concurrency

    def __call__(self, conn: int, seq: int) -> tuple[str, str, bytes | None, dict[str, str]]:
        user = (conn + seq * self.concurrency) % len(self.auth)
        return ("POST", self.path, b'{"quantity":1}',
                {"Authorization": self.auth[user], "Idempotency-Key": f"{conn}-{seq}-{secrets.token_hex(6)}"})


def _say(text: str) -> None:
    print(text, flush=True)


async def _buyers(srv: Served, cfg: BenchConfig) -> list[str]:
    """Enough buyers that the per-buyer rate limit (5/s) does not bind."""
    pool = Pool(srv.url, size=16)
    try:
        return [a.token for a in await create_guests(pool, cfg.users, "bench-")]
    finally:
        await pool.close()


async def _purchase_setup(srv: Served, cfg: BenchConfig, tokens: list[str]) -> Purchase:
    """A new sale with endless stock for each run, so that no buyer nears the sale's limit of 100
    units however many runs there are (in a room of its own: one sale runs per room)."""
    pool = Pool(srv.url, size=4)
    try:
        scene = await create_scene(pool, title="bench purchases")
        sale = await launch_sale(pool, scene, stock=1_000_000, per_user_limit=100, starts_in_s=0, duration_s=3600)
    finally:
        await pool.close()
    return Purchase(sale["id"], tokens, cfg.concurrency)


async def _measured(srv: Served, make: RequestMaker, cfg: BenchConfig) -> dict[str, Any]:
    """Throughput and latency, plus the server's CPU time per request: on a shared machine the
    server may not get a whole core, and CPU per request does not depend on that."""
    cpu0, engine0, jobs0 = srv.cpu_s()
    wait0 = srv.cpu_wait_s()
    t0, client0 = time.monotonic(), time.process_time()
    tally = await measure(srv.url, make, concurrency=cfg.concurrency, seconds=cfg.seconds, warmup_s=cfg.warmup_s,
                          procs=cfg.procs)
    wall, client_cpu = time.monotonic() - t0, time.process_time() - client0
    cpu1, engine1, jobs1 = srv.cpu_s()
    out = tally.figures()
    n = max(1, tally.answered)
    out["server_cpu_us_per_request"] = round((cpu1 - cpu0) / n * 1e6, 1)
    out["engine_cpu_us_per_request"] = round((engine1 - engine0) / n * 1e6, 1)
    # The persister's share of the work, in livesale's background-jobs process.
    out["jobs_cpu_us_per_request"] = round((jobs1 - jobs0) / n * 1e6, 1)
    out["server_cpu_share"] = round((cpu1 - cpu0) / wall, 2)  # 1.0 = one whole core
    out["engine_cpu_share"] = round((engine1 - engine0) / wall, 2)
    out["jobs_cpu_share"] = round((jobs1 - jobs0) / wall, 2)
    # Ready to run but waiting for a CPU: how much the machine's other load held the server back.
    out["server_cpu_wait_share"] = round((srv.cpu_wait_s() - wait0) / wall, 2)
    # Near 1.0 the client was the limit (only measured when it runs in this process).
    out["client_cpu_share"] = round(client_cpu / wall, 2) if cfg.procs <= 1 else None
    out["client_cpu_us_per_request"] = round(client_cpu / n * 1e6, 1) if cfg.procs <= 1 else None
    # Everything one request cost the machine: on a machine with few cores the processes
    # besides the server (engine, jobs, client) compete with it for them.
    spent = (cpu1 - cpu0) + (engine1 - engine0) + (jobs1 - jobs0) + (client_cpu if cfg.procs <= 1 else 0.0)
    out["all_cpu_us_per_request"] = round(spent / n * 1e6, 1)
    return out


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


def _median(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median throughput, and every run's throughput beside it."""
    ranked = sorted(runs, key=lambda r: float(r["requests_per_s"]))
    return {**ranked[len(ranked) // 2], "runs_requests_per_s": [r["requests_per_s"] for r in runs]}


async def http_part(cfg: BenchConfig, workdir: Path, workers: int) -> dict[str, Any]:
    """Both servers up at once, measured in turn (bare, purchase, bare, ...) so drift on a shared
    machine hits both alike; the median of `repeat` runs each."""
    _say(f"bench: purchase vs bare Starlette, {workers} worker(s), {cfg.concurrency} connections, "
         f"{cfg.seconds:.0f}s x {cfg.repeat}")
    bare_runs: list[dict[str, Any]] = []
    buy_runs: list[dict[str, Any]] = []
    with baseline(workdir, workers) as bare_srv, livesale(workdir, workers) as srv:
        tokens = await _buyers(srv, cfg)
        for _ in range(cfg.repeat):
            bare_runs.append(await _measured(bare_srv, BareBuy(), cfg))
            buy_runs.append(await _measured(srv, await _purchase_setup(srv, cfg, tokens), cfg))
            refused = {k: v for k, v in buy_runs[-1]["statuses"].items() if k != "201"}
            if refused:  # such answers are not counted in requests/s: the run measured less than it should
                _say(f"bench: WARNING: purchases answered other than 201: {refused}")
    bare, buy = _median(bare_runs), _median(buy_runs)
    return {"workers": workers, "baseline": bare, "purchase": buy,
            "ratio_throughput": _ratio(buy["requests_per_s"], bare["requests_per_s"]),
            # What the ratio would be if both were CPU-bound on a whole core: bare CPU / purchase CPU.
            "ratio_cpu": _ratio(bare["server_cpu_us_per_request"], buy["server_cpu_us_per_request"]),
            "p99_ms": {"purchase": buy["latency_ms"].get("p99"), "baseline": bare["latency_ms"].get("p99")}}


async def broadcast_part(cfg: BenchConfig, workdir: Path) -> list[dict[str, Any]]:
    out = []
    for n in cfg.viewers:
        _say(f"bench: broadcast to {n} viewers at {cfg.chat_rate:.0f} messages/s for {cfg.seconds:.0f}s")
        # A fresh server per size, so one size's memory does not carry into the next.
        with livesale(workdir) as srv:
            out.append(await broadcast_run(srv, n, seconds=cfg.seconds, procs=cfg.procs, chat_rate=cfg.chat_rate))
    return out


def _fmt(x: Any, spec: str = ",.0f") -> str:
    if x is None:
        return "-"
    return format(x, spec) if isinstance(x, (int, float)) else str(x)


def table(res: dict[str, Any]) -> str:
    rows: list[tuple[str, str, str, str, str]] = []
    for h in res.get("http", []):
        w = h["workers"]
        rows.append((f"purchase, {w} worker(s): req/s", _fmt(h["purchase"]["requests_per_s"]),
                     f"bare {_fmt(h['baseline']['requests_per_s'])}", _fmt(h["ratio_throughput"], ".2f"), ""))
        rows.append((f"purchase, {w} worker(s): p99 ms", _fmt(h["purchase"]["latency_ms"].get("p99"), ".1f"),
                     f"bare {_fmt(h['baseline']['latency_ms'].get('p99'), '.1f')}", "", ""))
        buy_cpu, bare_cpu = h["purchase"]["server_cpu_us_per_request"], h["baseline"]["server_cpu_us_per_request"]
        rows.append((f"purchase, {w} worker(s): server CPU us/req", _fmt(buy_cpu), f"bare {_fmt(bare_cpu)}",
                     _fmt(h["ratio_cpu"], ".2f"), ""))
        p, b = h["purchase"], h["baseline"]
        rows.append((f"purchase, {w} worker(s): engine/jobs CPU us/req",
                     f"{_fmt(p['engine_cpu_us_per_request'])}/{_fmt(p['jobs_cpu_us_per_request'])}", "bare -/-", "", ""))
        rows.append((f"purchase, {w} worker(s): all processes CPU us/req", _fmt(p["all_cpu_us_per_request"]),
                     f"bare {_fmt(b['all_cpu_us_per_request'])}",
                     _fmt(_ratio(b["all_cpu_us_per_request"], p["all_cpu_us_per_request"]), ".2f"), ""))
        rows.append((f"purchase, {w} worker(s): CPU share srv/client",
                     f"{p['server_cpu_share']}/{p['client_cpu_share']}",
                     f"bare {b['server_cpu_share']}/{b['client_cpu_share']}", "", ""))
        rows.append((f"purchase, {w} worker(s): server waited for CPU", f"{p['server_cpu_wait_share']}",
                     f"bare {b['server_cpu_wait_share']}", "", ""))
    if "scaling" in res:
        s = res["scaling"]
        rows.append(("purchase 2 workers vs 1", _fmt(s["purchase_w2"]), f"w1 {_fmt(s['purchase_w1'])}",
                     _fmt(s["ratio_purchase"], ".2f"), ""))
        rows.append(("bare 2 workers vs 1", _fmt(s["baseline_w2"]), f"w1 {_fmt(s['baseline_w1'])}",
                     _fmt(s["ratio_baseline"], ".2f"), ""))
    if "redis" in res:
        r = res["redis"]
        rows.append(("reserve.lua on the engine: ops/s", _fmt(r["reserve"]["ops_per_s"]),
                     f"INCR {_fmt(r['incr']['ops_per_s'])}", _fmt(r["ratio_reserve_vs_incr"], ".3f"), ""))
    if "cluster" in res:
        c = res["cluster"]
        for layout, label in (("one_sale", "one hot sale"), ("many_sales", f"{c['sales']} sales")):
            three, one = c[f"{layout}_3_masters"], c[f"{layout}_1_masters"]
            rows.append((f"reserve, {label}: 3 masters vs 1", _fmt(three["ops_per_s"]), f"1 master {_fmt(one['ops_per_s'])}",
                         _fmt(c[f"ratio_{layout}_3_vs_1"], ".2f"), ""))
    for b in res.get("broadcast", []):
        n = b["viewers"]
        offered = b["messages_sent"] / b["seconds"] if b["seconds"] else 0.0
        rows.append((f"broadcast {n}: deliveries/s", _fmt(b["deliveries_per_s"]),
                     f"{offered:.1f} msg/s sent x {b['connected'] - 1} viewers",
                     _fmt(b["delivery_ratio"], ".3f"), "1.00"))
        rows.append((f"broadcast {n}: delivery p99 ms", _fmt(b["delivery_ms"].get("p99"), ".1f"),
                     f"p50 {_fmt(b['delivery_ms'].get('p50'), '.1f')}", "", ""))
        rows.append((f"broadcast {n}: CPU share server/client", f"{b['server_cpu_share']}",
                     f"client {b['client_cpu_share']}", "", ""))
        rows.append((f"broadcast {n}: server CPU us/message", _fmt(b.get("server_cpu_us_per_message")),
                     f"{b['messages_sent']} messages", "", ""))
        rows.append((f"broadcast {n}: KiB per idle viewer", _fmt(b["memory_per_idle_viewer_kib"], ".1f"),
                     f"RSS {b['server_rss_kib']['before'] // 1024}->{b['server_rss_kib']['after_connect'] // 1024} MiB",
                     "", f"< {MEMORY_TARGET_KIB:.0f}"))
    head = ("measure", "value", "baseline", "ratio", "target")
    widths = [max(len(r[i]) for r in rows + [head]) for i in range(5)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)


async def bench(cfg: BenchConfig) -> int:
    cfg.out.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="livesale-bench-"))
    res: dict[str, Any] = {"machine": describe(), "command": " ".join(["python -m load"] + sys.argv[1:]),
                           "config": {"seconds": cfg.seconds, "concurrency": cfg.concurrency, "procs": cfg.procs,
                                      "redis_ops": cfg.redis_ops, "viewers": cfg.viewers,
                                      "chat_rate": cfg.chat_rate, "users": cfg.users, "warmup_s": cfg.warmup_s,
                                      "repeat": cfg.repeat}}
    started = time.monotonic()
    try:
        if cfg.wants("http") or cfg.wants("workers"):
            res["http"] = [await http_part(cfg, workdir, 1)]
        if cfg.wants("workers"):
            res["http"].append(await http_part(cfg, workdir, 2))
            w1, w2 = res["http"]
            res["scaling"] = {"purchase_w1": w1["purchase"]["requests_per_s"],
                              "purchase_w2": w2["purchase"]["requests_per_s"],
                              "ratio_purchase": _ratio(w2["purchase"]["requests_per_s"],
                                                       w1["purchase"]["requests_per_s"]),
                              "baseline_w1": w1["baseline"]["requests_per_s"],
                              "baseline_w2": w2["baseline"]["requests_per_s"],
                              "ratio_baseline": _ratio(w2["baseline"]["requests_per_s"],
                                                       w1["baseline"]["requests_per_s"])}
        if cfg.wants("redis"):
            _say(f"bench: reserve.lua vs INCR on the engine, {cfg.redis_ops} calls each")
            res["redis"] = await engine_bench(workdir, cfg.redis_ops)
        if cfg.wants("cluster"):
            _say(f"bench: reserve.lua on a 1-master and a 3-master cluster, one hot sale and {SALES} sales, "
                 f"{cfg.redis_ops} calls each")
            res["cluster"] = await cluster_bench(workdir, cfg.redis_ops)
        if cfg.wants("broadcast"):
            res["broadcast"] = await broadcast_part(cfg, workdir)
    except (RunError, SetupError, RuntimeError) as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    except Exception:  # a server or engine that stopped answering, or a bug: no figures
        traceback.print_exc()
        print("bench: stopped on the error above; nothing measured is reported", file=sys.stderr)
        return 2
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    res["seconds"] = round(time.monotonic() - started, 1)
    res["machine_after"] = {"load_avg": describe()["load_avg"]}
    (cfg.out / "bench.json").write_text(json.dumps(res, indent=2) + "\n")
    _say("\n" + table(res))
    _say(f"\nmachine: {res['machine']['nproc']} x {res['machine']['cpu']}, {res['machine']['ram_gib']} GiB, "
         f"Python {res['machine']['python']}, load average {res['machine']['load_avg']} before, "
         f"{res['machine_after']['load_avg']} after")
    _say(f"wrote {cfg.out / 'bench.json'}")
    return 0
