"""`python -m load` (or `livesale-load`): spike a running server, or run the benchmarks."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from load.messages import BuyerMix
from load.runtime import raise_fd_limit, run


def _spike_args(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    d = BuyerMix()
    p = sub.add_parser("spike", help="a flash-sale spike against a running server",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       description="Sets up its own host, room, product and sale through the API, connects "
                                   "viewers who chat and like, fires buyers at the sale's start, then checks "
                                   "that nothing was oversold and writes report.json and report.png. The "
                                   "server must exempt this address from per-IP limits: start it with "
                                   "LIVESALE_RATE_LIMIT_EXEMPT_IPS=127.0.0.1. Exit status: 0 pass, 1 the "
                                   "correctness verdict failed, 2 the run could not be done.")
    p.add_argument("--url", action="append", default=None,
                   help="a server (default http://127.0.0.1:8000); give several to spread viewers and buyers "
                        "over them, as a load balancer would")
    p.add_argument("--viewers", type=int, default=1000, help="WebSocket viewers in the room")
    p.add_argument("--buyers", type=int, default=5000, help="buyers firing at the sale's start")
    p.add_argument("--stock", type=int, default=1000, help="units on sale")
    p.add_argument("--limit", type=int, default=2, help="per-buyer limit of the sale")
    p.add_argument("--procs", type=int, default=1, help="worker processes sharing the viewers and buyers")
    p.add_argument("--logged-in", type=float, default=0.1,
                   help="share of viewers with a guest account (they chat and like; the rest only watch)")
    p.add_argument("--chat-rate", type=float, default=None,
                   help="danmaku per second, whole room (default: 0.2 per logged-in viewer, 20/s for 1,000 viewers)")
    p.add_argument("--like-rate", type=float, default=None,
                   help="like frames per second, whole room (default: 0.2 per logged-in viewer)")
    p.add_argument("--lead-s", type=int, default=3, help="the sale starts this long after its launch")
    p.add_argument("--linger-s", type=float, default=2.0, help="keep watching after the last buyer")
    p.add_argument("--timeout", type=float, default=300.0,
                   help="bound on the run, seconds: setup, buying and lingering stop by then (collecting the "
                   "workers' results, --persist-wait and reading the orders back come after)")
    p.add_argument("--persist-wait", type=float, default=30.0,
                   help="how long to wait for orders to reach SQL before comparing")
    p.add_argument("--greedy", type=float, default=d.greedy, help="share of buyers who buy again until refused")
    p.add_argument("--hammer", type=float, default=d.hammer,
                   help=f"share of buyers who fire {d.hammer_burst} attempts at once")
    p.add_argument("--double-click", type=float, default=d.double_click,
                   help="share of buyers who send the same key twice at once")
    p.add_argument("--bulk", type=float, default=d.bulk, help="share of buyers who ask for --limit units at once")
    p.add_argument("--early", type=float, default=d.early, help="share of buyers who click before the start")
    p.add_argument("--pay", type=float, default=d.pay, help="share of buyers who pay what they reserved")
    p.add_argument("--spread-s", type=float, default=d.spread_s, help="first clicks spread over this long")
    p.add_argument("--retries", type=int, default=d.retries, help="same-key retries after a timeout or drop")
    p.add_argument("--request-timeout", type=float, default=d.timeout_s, help="per purchase request, seconds")
    p.add_argument("--out", type=Path, default=Path("."), help="where report.json and report.png go")
    p.add_argument("--no-chart", action="store_true", help="skip report.png (no matplotlib needed)")
    p.add_argument("--keep-room", action="store_true", help="leave the room live afterwards")


def _bench_args(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("bench", help="benchmarks against baselines, on servers it starts itself",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       description="Starts its own `livesale serve` (fresh data dir, embedded Valkey) and a bare "
                                   "Starlette app on free loopback ports, measures, prints a table and writes "
                                   "bench.json.")
    p.add_argument("--seconds", type=float, default=10.0, help="measuring time per HTTP throughput run")
    p.add_argument("--concurrency", type=int, default=64, help="client connections for the HTTP runs")
    p.add_argument("--procs", type=int, default=1, help="client processes for the HTTP and broadcast runs")
    p.add_argument("--repeat", type=int, default=1,
                   help="HTTP runs per server, alternating with the baseline; the median is reported")
    p.add_argument("--redis-ops", type=int, default=200_000, help="script calls per Redis run")
    p.add_argument("--viewers", type=int, nargs="+", default=[1000, 5000], help="broadcast audience sizes")
    p.add_argument("--chat-rate", type=float, default=20.0, help="danmaku per second during the broadcast runs")
    p.add_argument("--only", nargs="+", choices=["http", "redis", "cluster", "broadcast", "workers"],
                   help="run only these parts")
    p.add_argument("--out", type=Path, default=Path("."), help="where bench.json goes")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="livesale-load", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _spike_args(sub)
    _bench_args(sub)
    args = parser.parse_args(argv)
    raise_fd_limit()
    if args.command == "spike":
        from load.spike import spike
        from load.spike_config import SpikeConfig

        mix = BuyerMix(greedy=args.greedy, hammer=args.hammer, double_click=args.double_click, bulk=args.bulk,
                       early=args.early, pay=args.pay, spread_s=args.spread_s, retries=args.retries,
                       timeout_s=args.request_timeout)
        urls = tuple(u.rstrip("/") for u in args.url or ["http://127.0.0.1:8000"])
        cfg = SpikeConfig(urls=urls, viewers=args.viewers, buyers=args.buyers, stock=args.stock,
                          limit=args.limit, procs=args.procs, logged_in=args.logged_in, chat_rate=args.chat_rate,
                          like_rate=args.like_rate, lead_s=args.lead_s, linger_s=args.linger_s,
                          timeout_s=args.timeout, persist_wait_s=args.persist_wait, out=args.out, mix=mix,
                          keep_room=args.keep_room, chart=not args.no_chart)
        return run(spike(cfg))
    from load.bench import BenchConfig, bench

    return run(bench(BenchConfig(seconds=args.seconds, concurrency=args.concurrency, procs=args.procs,
                                 redis_ops=args.redis_ops, repeat=args.repeat, viewers=args.viewers,
                                 chat_rate=args.chat_rate, only=set(args.only or []), out=args.out)))


if __name__ == "__main__":
    sys.exit(main())
