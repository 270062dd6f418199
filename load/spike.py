"""`load spike`: the parent process. Sets the scene up through the API, runs the
workers (viewers and buyers) across processes, follows the stock, then checks
correctness and writes the report.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import sys
import time
import traceback
from dataclasses import asdict
from pathlib import Path

from load import report
from load.fleet import Fleet, RunError, split
from load.http import HttpError, Pool
from load.machine import describe
from load.messages import (
    Attempt,
    BuyerRecord,
    BuyersDone,
    Go,
    Ready,
    Stop,
    WorkerPlan,
    WorkerResult,
)
from load.setup import (
    Scene,
    SetupError,
    create_scene,
    end_room,
    end_sale,
    get_sale,
    launch_sale,
)
from load.spike_chart import write_chart
from load.spike_config import SpikeConfig

POLL_EVERY_S = 0.1
from load.verify import verdict


class Spike:
    def __init__(self, cfg: SpikeConfig) -> None:
        self.cfg = cfg
        self.pool = Pool(cfg.url, size=32)
        self.started = time.monotonic()
        self.deadline = self.started + cfg.timeout_s
        self.fleet = Fleet(self.deadline + 30)
        self.polls: list[tuple[float, int, int, int]] = []
        self.tty = sys.stdout.isatty()

    def _plans(self, scene: Scene, run_id: str) -> list[WorkerPlan]:
        cfg = self.cfg
        n = cfg.workers
        viewers, buyers = split(cfg.viewers, n), split(cfg.buyers, n)
        chatters = split(cfg.chatters(), n)
        per_chatter = max(1, cfg.chatters())
        chat, likes = cfg.chat_per_s(), cfg.likes_per_s()
        chat_interval = per_chatter / chat if chat > 0 else 0.0
        like_interval = per_chatter / likes if likes > 0 else 0.0
        # Worker i talks to server i mod len(urls): each server gets an even share of both.
        return [WorkerPlan(index=i, url=cfg.urls[i % len(cfg.urls)], room_id=scene.room_id, run_id=run_id,
                           viewers=viewers[i], chatters=chatters[i], chat_interval_s=chat_interval,
                           like_interval_s=like_interval, buyers=buyers[i], mix=cfg.mix, deadline_s=cfg.timeout_s,
                           observer=(i == 0))
                for i in range(n)]

    # --- side tasks ------------------------------------------------------------------------
    async def _show_progress(self) -> None:
        last_attempts, last_t = 0, time.monotonic()
        while True:
            await asyncio.sleep(1.0)
            ps = list(self.fleet.progress.values())
            attempts = sum(p.attempts for p in ps)
            now = time.monotonic()
            rate = (attempts - last_attempts) / max(0.001, now - last_t)
            last_attempts, last_t = attempts, now
            remaining = self.polls[-1][1] if self.polls else "-"
            line = (f"[{now - self.started:6.1f}s {self.fleet.phase:<8}] viewers {sum(p.viewers_open for p in ps)}/"
                    f"{self.cfg.viewers}  buyers done {sum(p.buyers_done for p in ps)}/{self.cfg.buyers}  "
                    f"attempts {attempts} ({rate:.0f}/s)  orders {sum(p.reserved for p in ps)}  "
                    f"429 {sum(p.rate_limited for p in ps)}  errors {sum(p.errors for p in ps)}  "
                    f"remaining {remaining}  chats {sum(p.chats_sent for p in ps)}  "
                    f"events {sum(p.events for p in ps)}")
            if self.tty:
                print("\r" + line, end="", flush=True)
            else:
                print(line, flush=True)

    async def _poll_stock(self, sale_id: str, offset_ms: float, stop: asyncio.Event) -> None:
        while not stop.is_set() and time.monotonic() < self.deadline:
            with contextlib.suppress(HttpError, SetupError):
                sent = time.time() * 1000
                s = await get_sale(self.pool, sale_id)
                # The figures were read somewhere during the request: date them at its middle.
                at = (sent + time.time() * 1000) / 2 + offset_ms
                self.polls.append((at, int(s["remaining"]), int(s["reserved"]), int(s["paid"])))
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), POLL_EVERY_S)

    # --- the run -------------------------------------------------------------------------------
    async def run(self) -> int:
        cfg = self.cfg
        shown = asyncio.create_task(self._show_progress())
        stop_polling = asyncio.Event()
        poller: asyncio.Task[None] | None = None
        timings: dict[str, float] = {}
        scene: Scene | None = None
        try:
            try:
                cfg.out.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise RunError(f"cannot write to --out {cfg.out}: {exc}") from None
            for url in cfg.urls:
                await _check_health(url)
            scene = await create_scene(self.pool)
            run_id = secrets.token_hex(3)
            self.fleet.spawn(self._plans(scene, run_id))
            ready = await self.fleet.collect(Ready, cfg.timeout_s)
            timings["setup"] = time.monotonic() - self.started
            offset = ready[0].clock_offset_ms

            self.fleet.phase = "sale"
            # Nothing may end or be released during the run (the verdict relies on it): the sale
            # and its reservations outlast it.
            sale = await launch_sale(self.pool, scene, stock=cfg.stock, per_user_limit=cfg.limit,
                                     starts_in_s=cfg.lead_s, duration_s=int(cfg.timeout_s) + 600,
                                     payment_timeout_s=min(86_400, max(900, int(cfg.timeout_s) + 600)))
            poller = asyncio.create_task(self._poll_stock(sale["id"], offset, stop_polling))
            self.fleet.broadcast(Go(sale["id"], int(sale["starts_at_ms"]), cfg.limit))
            go_at = time.monotonic()
            await self.fleet.collect(BuyersDone, self.deadline - time.monotonic())
            timings["buy_phase"] = time.monotonic() - go_at
            self.fleet.phase = "linger"
            await asyncio.sleep(min(cfg.linger_s, max(0.0, self.deadline - time.monotonic())))
            stop_polling.set()
            self.fleet.broadcast(Stop())
            self.fleet.phase = "collect"
            results = await self.fleet.collect(WorkerResult, 60)
            self.fleet.phase = "verify"
            await end_sale(self.pool, scene, sale["id"])
            final = await get_sale(self.pool, sale["id"])
            records, attempts = _merge(results)
            t_verify = time.monotonic()
            seen = [p[1] for p in self.polls] + [e[1] for r in results.values() for e in r.viewers.sale_series]
            if cfg.buyers and not any(a.kind == "purchase" for a in attempts):
                raise RunError("no buyer sent a purchase before the run's deadline: nothing to judge",
                               "raise --timeout (setup, --lead-s and the buyers must fit in it)")
            checks, facts = await verdict(self.pool, final, records, attempts, cfg.limit, cfg.limit + 2,
                                          cfg.persist_wait_s, seen, hammer_burst=cfg.mix.hammer_burst)
            timings["verify"] = time.monotonic() - t_verify
            timings["total"] = time.monotonic() - self.started
        except (RunError, SetupError, HttpError) as exc:
            self._stop_line()
            print(f"load: {exc}", file=sys.stderr)
            hint = getattr(exc, "hint", "")  # HttpError has none
            if hint:
                print(f"hint: {hint}", file=sys.stderr)
            return 2
        except Exception:  # a bug, here or an answer nothing expected: the run could not be judged
            self._stop_line()
            traceback.print_exc()
            print("load: the run stopped on the error above; no verdict", file=sys.stderr)
            return 2
        finally:
            shown.cancel()
            stop_polling.set()
            if poller is not None:
                await asyncio.gather(poller, return_exceptions=True)
            self.fleet.broadcast(Stop())
            await self.fleet.reap()
            if scene is not None and not cfg.keep_room:
                with contextlib.suppress(Exception):
                    await end_room(self.pool, scene)
            await self.pool.close()
        self._stop_line()
        data = report.SpikeData(
            config={**{k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()}},
            machine=describe(), room_id=scene.room_id, sale=sale, final_sale=final,
            results=[results[i] for i in sorted(results)], records=records, attempts=attempts, polls=self.polls,
            checks=checks, facts=facts, timings=timings)
        built = report.build(data)
        print(report.render(built))
        try:
            report.write_json(built, cfg.out / "report.json")
            report.write_attempts(data, cfg.out / "attempts.csv")
            if cfg.chart:
                write_chart(data, cfg.out / "report.png")
        except Exception as exc:
            print(f"load: could not write the report to {cfg.out}: {exc!r}", file=sys.stderr)
            return 2
        print(f"wrote {cfg.out / 'report.json'}, {cfg.out / 'attempts.csv'}"
              + (f" and {cfg.out / 'report.png'}" if cfg.chart else ""))
        return 0 if data.ok else 1

    def _stop_line(self) -> None:
        if self.tty:
            print(flush=True)


async def _check_health(url: str) -> None:
    pool = Pool(url, size=1)
    try:
        r = await pool.request("GET", "/healthz", timeout=5, attempts=1)
    except HttpError as exc:
        raise RunError(f"no server answering at {url} ({exc})",
                       "start one with `LIVESALE_RATE_LIMIT_EXEMPT_IPS=127.0.0.1 livesale serve` "
                       "or point --url at it") from None
    finally:
        await pool.close()
    if r.status != 200:
        raise RunError(f"{url}/healthz answered {r.status}: {r.body[:200]!r}")


def _merge(results: dict[int, WorkerResult]) -> tuple[list[BuyerRecord], list[Attempt]]:
    """Concatenate the workers' buyers; attempt buyer indexes become global."""
    records: list[BuyerRecord] = []
    attempts: list[Attempt] = []
    for i in sorted(results):
        base = len(records)
        records += results[i].buyers
        for a in results[i].attempts:
            a.buyer += base
            attempts.append(a)
    return records, attempts


async def spike(cfg: SpikeConfig) -> int:
    try:
        cfg.check()
    except SetupError as exc:
        print(f"load: {exc}", file=sys.stderr)
        return 2
    return await Spike(cfg).run()
