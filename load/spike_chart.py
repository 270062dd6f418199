"""The spike's chart (report.png): latency over time per outcome, attempts per second, the stock
draining and danmaku latency."""

from __future__ import annotations

from pathlib import Path

from load.report import CATEGORY_ORDER, SpikeData, category

COLORS = {"reserved": "tab:green", "duplicate": "tab:olive", "sold_out": "tab:gray", "limit_exceeded": "tab:orange",
          "rate_limited": "tab:purple", "not_started": "tab:cyan", "ended": "tab:brown", "errors": "tab:red"}


def write_chart(data: SpikeData, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")  # no display; must precede pyplot
    import matplotlib.pyplot as plt

    t0 = data.starts_at_ms
    buys = [a for a in data.attempts if a.kind == "purchase"]
    fig, axes = plt.subplots(4, 1, figsize=(11, 13), sharex=True)
    ax_lat, ax_rate, ax_stock, ax_chat = axes
    for cat in CATEGORY_ORDER:
        pts = [a for a in buys if category(a.outcome) == cat]
        if pts:
            ax_lat.scatter([(a.at_ms - t0) / 1000 for a in pts], [max(a.latency_ms, 0.1) for a in pts], s=4,
                           alpha=0.5, label=f"{cat} ({len(pts)})", color=COLORS[cat])
    ax_lat.set_yscale("log")
    ax_lat.set_ylabel("purchase latency (ms)")
    ax_lat.legend(loc="upper right", fontsize=8, markerscale=3)
    ax_lat.set_title(f"spike: {data.config['buyers']} buyers, {data.config['viewers']} viewers, "
                     f"stock {data.sale['stock']} (verdict {'PASS' if data.ok else 'FAIL'})")

    if buys:
        lo = min(int((a.at_ms - t0) // 100) for a in buys)
        hi = max(int((a.at_ms - t0) // 100) for a in buys)
        xs = [(lo + i) / 10 for i in range(hi - lo + 1)]
        bottom = [0.0] * len(xs)
        for cat in CATEGORY_ORDER:
            counts = [0.0] * len(xs)
            for a in buys:
                if category(a.outcome) == cat:
                    counts[int((a.at_ms - t0) // 100) - lo] += 10  # per 100 ms -> per second
            if any(counts):
                ax_rate.bar(xs, counts, width=0.1, bottom=bottom, align="edge", color=COLORS[cat], label=cat)
                bottom = [b + c for b, c in zip(bottom, counts)]
        ax_rate.legend(loc="upper right", fontsize=8)
    ax_rate.set_ylabel("attempts / s (by send time)")

    polls = data.polls
    if polls:
        ax_stock.step([(p[0] - t0) / 1000 for p in polls], [p[1] for p in polls], where="post",
                      label="remaining (GET /api/sales)")
    events = sorted(pt for r in data.results for pt in r.viewers.sale_series)
    if events:
        ax_stock.scatter([(e[0] - t0) / 1000 for e in events], [e[1] for e in events], s=6, color="tab:red",
                         label="remaining (sale_update events)", zorder=3)
    ax_stock.set_ylabel("units remaining")
    ax_stock.legend(loc="upper right", fontsize=8)

    chat = sorted(pt for r in data.results for pt in r.viewers.danmaku_series)
    if chat:
        ax_chat.scatter([(c[0] - t0) / 1000 for c in chat], [max(c[1], 0.1) for c in chat], s=4, alpha=0.6)
        ax_chat.set_yscale("log")
    ax_chat.set_ylabel("danmaku delivery (ms)")
    ax_chat.set_xlabel("seconds since the sale's start (server clock)")
    for ax in axes:
        ax.axvline(0, color="black", linewidth=0.8, linestyle="--")
        ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
