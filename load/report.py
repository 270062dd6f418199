"""The spike's report: figures from the merged raw results, the printed summary, report.json and
attempts.csv (the chart: load/spike_chart.py)."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from load.messages import Attempt, BuyerRecord, WorkerResult
from load.stats import Histogram, spread, summary
from load.verify import Check
from server.inventory.records import ReserveStatus

# How the server's answers (reserve.lua's statuses) roll up in the summary; anything else (timeouts,
# 5xx, ...) counts as an error.
CATEGORY: dict[ReserveStatus, str] = {
    "reserved": "reserved", "duplicate": "duplicate", "sold_out": "sold_out", "not_enough": "sold_out",
    "limit_exceeded": "limit_exceeded", "rate_limited": "rate_limited", "not_started": "not_started", "ended": "ended"}
CATEGORY_ORDER = ["reserved", "duplicate", "sold_out", "limit_exceeded", "rate_limited", "not_started", "ended",
                  "errors"]


def category(outcome: str) -> str:
    return CATEGORY.get(cast(ReserveStatus, outcome), "errors")  # any answer: a status, or a timeout, a 5xx...


@dataclass
class SpikeData:
    """Everything a finished run knows, merged from the workers."""
    config: dict[str, Any]
    machine: dict[str, Any]
    room_id: str
    sale: dict[str, Any]            # as launched
    final_sale: dict[str, Any]      # after the run (GET /api/sales/{id})
    results: list[WorkerResult]
    records: list[BuyerRecord]
    attempts: list[Attempt]         # buyer indexes are global
    polls: list[tuple[float, int, int, int]]  # (server ms, remaining, reserved, paid)
    checks: list[Check]
    facts: dict[str, Any]
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def starts_at_ms(self) -> int:
        return int(self.sale["starts_at_ms"])

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)


def _purchases(data: SpikeData) -> dict[str, Any]:
    buys = [a for a in data.attempts if a.kind == "purchase"]
    if not buys:
        return {"attempts": 0}
    first = min(a.at_ms for a in buys)
    last = max(a.at_ms + a.latency_ms for a in buys)
    span_s = max(0.001, (last - first) / 1000)
    per_tenth: dict[int, int] = {}
    for a in buys:
        slot = int((a.at_ms - first) // 100)
        per_tenth[slot] = per_tenth.get(slot, 0) + 1
    by_outcome: dict[str, list[float]] = {}
    by_category: dict[str, list[float]] = {}
    for a in buys:
        by_outcome.setdefault(a.outcome, []).append(a.latency_ms)
        by_category.setdefault(category(a.outcome), []).append(a.latency_ms)
    sold_out_at = next((a.at_ms + a.latency_ms for a in sorted(buys, key=lambda a: a.at_ms + a.latency_ms)
                        if a.outcome == "sold_out"), None)
    styles: dict[str, int] = {}
    for r in data.records:
        styles[r.style] = styles.get(r.style, 0) + 1
    return {
        "attempts": len(buys),
        "span_s": round(span_s, 3),
        "attempts_per_s": round(len(buys) / span_s, 1),
        "peak_attempts_per_s": max(per_tenth.values()) * 10,
        "first_sold_out_after_ms": round(sold_out_at - data.starts_at_ms, 1) if sold_out_at else None,
        "latency_ms_by_category": {c: summary(by_category[c]) for c in CATEGORY_ORDER if c in by_category},
        "latency_ms_by_outcome": {o: summary(v) for o, v in sorted(by_outcome.items())},
        "retries": sum(1 for a in buys if a.try_no > 0),
        "buyer_styles": styles,
    }


def _payments(data: SpikeData) -> dict[str, Any]:
    pays = [a for a in data.attempts if a.kind == "pay"]
    outcomes: dict[str, list[float]] = {}
    for a in pays:
        outcomes.setdefault(a.outcome, []).append(a.latency_ms)
    return {"attempts": len(pays), "latency_ms_by_outcome": {o: summary(v) for o, v in sorted(outcomes.items())}}


def _viewers(data: SpikeData) -> dict[str, Any]:
    connect_ms: list[float] = []
    events: list[int] = []
    frames: list[int] = []
    drops: dict[str, int] = {}
    failures: dict[str, int] = {}
    errors: dict[str, int] = {}
    for r in data.results:
        v = r.viewers
        connect_ms += v.connect_ms
        events += v.events
        frames += v.frames
        for code, n in v.drops.items():
            drops[str(code)] = drops.get(str(code), 0) + n
        for name, n in v.connect_failures.items():
            failures[name] = failures.get(name, 0) + n
        for code_name, n in v.server_errors.items():
            errors[code_name] = errors.get(code_name, 0) + n
    return {
        "requested": data.config["viewers"],
        "connected": sum(r.viewers.connected for r in data.results),
        "connect_phase_s": round(max((r.viewers.connect_s for r in data.results), default=0.0), 2),
        "connect_ms": summary(connect_ms),
        "connect_failures": failures,
        "events_per_viewer": spread(events),
        "frames_per_viewer": spread(frames),
        "dropped": {"total": sum(drops.values()), "by_close_code": drops},
        "reconnects": sum(r.viewers.reconnects for r in data.results),
        "error_events": errors,
        "likes_sent": sum(r.viewers.likes_sent for r in data.results),
    }


def _danmaku(data: SpikeData) -> dict[str, Any]:
    hist = Histogram()
    receipts: dict[str, int] = {}
    for r in data.results:
        hist.merge(r.viewers.danmaku)
        for nonce, n in r.viewers.receipts.items():
            receipts[nonce] = receipts.get(nonce, 0) + n
    sent = {n for r in data.results for n in r.sent_nonces}
    viewers = sum(len(r.viewers.events) for r in data.results)
    # Each message should reach every other viewer; those connected only part of the time lower the ratio.
    expected = len(sent) * max(0, viewers - 1)
    got = sum(n for nonce, n in receipts.items() if nonce in sent)
    send_ms = Histogram()
    for r in data.results:
        send_ms.merge(r.viewers.chat_send_ms)
    return {"sent": len(sent), "receipts": got, "expected_receipts": expected,
            "sends_skipped": sum(r.viewers.chats_skipped for r in data.results), "send_ms": send_ms.summary(),
            "delivery_ratio": round(got / expected, 4) if expected else None,
            "unknown_nonces": sum(1 for nonce in receipts if nonce not in sent),
            "never_received": sum(1 for nonce in sent if nonce not in receipts),
            "latency_ms": hist.summary(),
            "foreign_chats": sum(r.viewers.foreign_chats for r in data.results)}


def build(data: SpikeData) -> dict[str, Any]:
    return {
        "ok": data.ok,
        "config": data.config,
        "machine": data.machine,
        "room_id": data.room_id,
        "sale": {"id": data.sale["id"], "stock": data.sale["stock"], "per_user_limit": data.sale["per_user_limit"],
                 "starts_at_ms": data.starts_at_ms, "final": {k: data.final_sale.get(k) for k in (
                     "status", "remaining", "reserved", "paid", "sold", "v")}},
        "timings_s": {k: round(v, 3) for k, v in data.timings.items()},
        "clock_offset_ms": [round(r.clock_offset_ms, 2) for r in data.results],
        # Near 1.0 a worker was CPU-bound during the buy phase: the generator, not the server, may set the pace.
        "worker_cpu_share": [round(r.buy_phase_cpu_s / r.buy_phase_s, 2) if r.buy_phase_s else None
                             for r in data.results],
        # Share of the buy phase a worker was ready to run but waited for a CPU (others had it).
        "worker_cpu_wait_share": [round(r.buy_phase_cpu_wait_s / r.buy_phase_s, 2) if r.buy_phase_s else None
                                  for r in data.results],
        "worker_loop_lag_ms": [r.loop_lag_ms.summary() for r in data.results],
        "purchases": _purchases(data),
        "payments": _payments(data),
        "viewers": _viewers(data),
        "danmaku": _danmaku(data),
        "verdict": {"ok": data.ok, "checks": [{"name": c.name, "ok": c.ok, "detail": c.detail} for c in data.checks],
                    "facts": data.facts},
    }


def _fmt_lat(s: dict[str, Any]) -> str:
    if not s.get("count"):
        return "-"
    return f"{s['p50']:>8.1f} {s['p95']:>8.1f} {s['p99']:>8.1f} {s['max']:>8.1f}"


def render(report: dict[str, Any]) -> str:
    p, v, d, t = report["purchases"], report["viewers"], report["danmaku"], report["timings_s"]
    lines = [
        "",
        f"== spike against {', '.join(report['config']['urls'])}  (room {report['room_id']}, sale {report['sale']['id']})",
        (f"setup {t.get('setup', 0):.1f}s, viewers connected {v['connected']}/{v['requested']} in "
         f"{v['connect_phase_s']:.1f}s (per connection p50 {v['connect_ms'].get('p50', '-')} ms, "
         f"p99 {v['connect_ms'].get('p99', '-')} ms), failures {v['connect_failures'] or 0}"),
        (f"purchases: {p.get('attempts', 0)} attempts over {p.get('span_s', 0)}s = {p.get('attempts_per_s', 0)}/s "
         f"(peak {p.get('peak_attempts_per_s', 0)}/s), retries {p.get('retries', 0)}, first sold_out "
         f"{p.get('first_sold_out_after_ms')} ms after the start"),
        f"  {'outcome':<16}{'count':>7} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'max ms':>8}",
    ]
    for name, s in p.get("latency_ms_by_category", {}).items():
        lines.append(f"  {name:<16}{s['count']:>7} {_fmt_lat(s)}")
    if p.get("latency_ms_by_category", {}).get("rate_limited", {}).get("count"):
        lines.append("  (rate_limited: a buyer's own purchase limit, 5 a second with a burst of 10 per buyer and "
                     "sale; it holds even for an address exempt from the per-address limits)")
    detail = {o: s["count"] for o, s in p.get("latency_ms_by_outcome", {}).items() if category(o) == "errors"}
    if detail:
        lines.append(f"  errors by kind: {detail}")
    lines += [
        (f"danmaku: {d['sent']} sent, {d['receipts']}/{d['expected_receipts']} deliveries "
         f"({(d['delivery_ratio'] or 0) * 100:.1f}%), latency p50 {d['latency_ms'].get('p50', '-')} ms, "
         f"p99 {d['latency_ms'].get('p99', '-')} ms, max {d['latency_ms'].get('max', '-')} ms"),
        (f"viewers: events per viewer min/mean/max {v['events_per_viewer']['min']}/{v['events_per_viewer']['mean']}/"
         f"{v['events_per_viewer']['max']}, dropped {v['dropped']['total']}"
         f"{' ' + str(v['dropped']['by_close_code']) if v['dropped']['by_close_code'] else ''}, "
         f"reconnects {v['reconnects']}, error events {v['error_events'] or 0}"),
    ]
    shares, waits = report["worker_cpu_share"], report["worker_cpu_wait_share"]
    lags = [lag.get("p99", "-") for lag in report["worker_loop_lag_ms"]]
    lines.append(f"generator: {len(shares)} worker process(es) during the buy phase: CPU share {shares}, "
                 f"waiting for a CPU {waits}, event-loop lag p99 {lags} ms"
                 + (" (the generator was short of CPU: its latencies include its own delay; try more --procs "
                    "or a quieter machine)" if any(x is not None and x >= 0.9 for x in shares)
                    or any(x is not None and x >= 0.3 for x in waits) else ""))
    lines.append(f"verdict: {'PASS' if report['ok'] else 'FAIL'}")
    for c in report["verdict"]["checks"]:
        lines.append(f"  [{'ok' if c['ok'] else 'FAIL'}] {c['name']}: {c['detail']}")
    return "\n".join(lines)


def write_json(report: dict[str, Any], path: Path) -> None:
    path.write_text(json.dumps(report, indent=2, sort_keys=False) + "\n")


def write_attempts(data: SpikeData, path: Path) -> None:
    """Every request the buyers made, one row each, for whoever wants to dig further."""
    t0 = data.starts_at_ms
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["buyer", "style", "kind", "key", "try", "sent_s", "latency_ms", "outcome", "status", "quantity",
                    "order_id"])
        for a in sorted(data.attempts, key=lambda a: a.at_ms):
            w.writerow([a.buyer, data.records[a.buyer].style, a.kind, a.key, a.try_no, round((a.at_ms - t0) / 1000, 4),
                        round(a.latency_ms, 2), a.outcome, a.status, a.quantity, a.order_id])
