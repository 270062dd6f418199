"""A load worker process: its share of the viewers and buyers.

Life: create guest accounts, measure the clock offset, connect viewers (they
chat and like until told to stop), report Ready; on Go, run the buyers at the
sale's start and report BuyersDone; on Stop (or its own deadline) close
everything and send the raw results. Every phase is bounded in time.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import random
import time
from multiprocessing.connection import Connection as Pipe
from typing import Any

from load.buyers import BuyContext, Buyer, assign_styles
from load.http import Pool, Target
from load.machine import cpu_wait_s
from load.messages import (
    BuyerRecord,
    BuyersDone,
    Failed,
    Go,
    Progress,
    Ready,
    Stop,
    ViewerResult,
    WorkerPlan,
    WorkerResult,
)
from load.pipes import listen
from load.runtime import raise_fd_limit, run
from load.setup import SetupError, create_guests
from load.stats import Histogram
from load.viewers import RoomContext, Viewer, clock_offset, every

PROGRESS_EVERY_S = 1.0
LAG_TICK_S = 0.1
DRAIN_QUIET_S = 2.0  # after the last chat is sent, wait until none of ours arrived for this long...
DRAIN_MAX_S = 30.0   # ...but no longer than this (a server far behind)


def main(pipe: Pipe, plan: WorkerPlan) -> None:
    """The spawn target."""
    raise_fd_limit()
    try:
        run(Worker(pipe, plan).main())
    except BaseException as exc:  # the parent must hear about it rather than wait for a deadline
        with contextlib.suppress(Exception):
            pipe.send(Failed(plan.index, f"worker {plan.index} crashed: {exc!r}"))
        raise
    finally:
        pipe.close()


class Worker:
    def __init__(self, pipe: Pipe, plan: WorkerPlan) -> None:
        self.pipe = pipe
        self.plan = plan
        self.inbox: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()
        self.deadline = time.monotonic() + plan.deadline_s
        self.viewers: list[Viewer] = []
        self.ctx: RoomContext | None = None
        self.buy: BuyContext | None = None
        self.quiet = asyncio.Event()  # set: chatters stop sending
        self.lag = Histogram()

    async def _next(self, timeout: float) -> Any:
        try:
            _, message = await asyncio.wait_for(self.inbox.get(), max(0.0, timeout))
        except TimeoutError:
            return None
        return Stop() if isinstance(message, EOFError) else message  # the parent is gone: wind down

    def _left(self) -> float:
        return self.deadline - time.monotonic()

    async def main(self) -> None:
        plan = self.plan
        listen(self.pipe, asyncio.get_running_loop(), self.inbox, plan.index)
        started = time.monotonic()
        pool = Pool(plan.url, size=16)
        tasks: list[asyncio.Task[Any]] = []
        progress: asyncio.Task[None] | None = None
        records: list[BuyerRecord] = []
        buy_phase_s = buy_phase_cpu_s = buy_phase_wait_s = live_s = live_cpu_s = 0.0
        try:
            try:
                accounts = await create_guests(pool, plan.chatters + plan.buyers, f"load{plan.index}-")
            except SetupError as exc:
                self.pipe.send(Failed(plan.index, str(exc), exc.hint))
                return
            rng = random.Random()
            chatter_accounts, buyer_accounts = accounts[:plan.chatters], accounts[plan.chatters:]
            styles = assign_styles(len(buyer_accounts), plan.mix, rng)
            records = [BuyerRecord(a.user_id, a.token, s) for a, s in zip(buyer_accounts, styles)]

            ctx = self.ctx = RoomContext(plan.url, plan.room_id, plan.run_id, ViewerResult())
            offset, rtt = await asyncio.wait_for(clock_offset(plan.url, plan.room_id), 30)
            ctx.offset_ms = offset
            tasks += await self._connect_viewers(ctx, [a.token for a in chatter_accounts])
            # Thousands of long-lived connection objects: keep the collector from walking them again and
            # again (full collections would stall the loop and show up as delivery latency).
            gc.collect()
            gc.freeze()
            progress = asyncio.create_task(self._progress())
            self.pipe.send(Ready(plan.index, self._open(), offset, rtt, time.monotonic() - started))

            message = await self._next(self._left())
            if isinstance(message, Go):
                tasks += self._start_chatting()
                tasks.append(asyncio.create_task(self._watch_lag()))
                buy_started, cpu_started = time.monotonic(), time.process_time()
                wait_started = cpu_wait_s(os.getpid())
                await self._run_buyers(message, records, offset, rng)
                buy_phase_s = time.monotonic() - buy_started
                buy_phase_cpu_s = time.process_time() - cpu_started
                buy_phase_wait_s = cpu_wait_s(os.getpid()) - wait_started
                self.pipe.send(BuyersDone(plan.index))
                while not isinstance(message, Stop) and self._left() > 0:
                    message = await self._next(self._left())
                live_s, live_cpu_s = time.monotonic() - buy_started, time.process_time() - cpu_started
        finally:
            if progress is not None:
                progress.cancel()
            await self._shut_down(tasks)
            await pool.close()
        assert self.ctx is not None
        for v in self.viewers:
            v.finish()
        self.ctx.result.sent_nonces = len(self.ctx.sent)
        self.pipe.send(WorkerResult(
            index=plan.index, clock_offset_ms=self.ctx.offset_ms, viewers=self.ctx.result, buyers=records,
            attempts=self.buy.attempts if self.buy else [], sent_nonces=self.ctx.sent,
            setup_s=time.monotonic() - started, buy_phase_s=buy_phase_s, buy_phase_cpu_s=buy_phase_cpu_s,
            live_s=live_s, live_cpu_s=live_cpu_s, buy_phase_cpu_wait_s=buy_phase_wait_s, loop_lag_ms=self.lag))

    async def _connect_viewers(self, ctx: RoomContext, chatter_tokens: list[str]) -> list[asyncio.Task[Any]]:
        plan = self.plan
        self.viewers = [Viewer(ctx, f"w{plan.index}v{i}", chatter_tokens[i] if i < len(chatter_tokens) else None,
                               observer=plan.observer and i == 0) for i in range(plan.viewers)]
        gate = asyncio.Semaphore(plan.connect_concurrency)

        async def connect(v: Viewer) -> None:
            async with gate:
                await v.connect()

        t0 = time.monotonic()
        await asyncio.gather(*(connect(v) for v in self.viewers))
        ctx.result.connect_s = time.monotonic() - t0
        ctx.result.connected = self._open()
        return [asyncio.create_task(v.run()) for v in self.viewers]

    def _start_chatting(self) -> list[asyncio.Task[Any]]:
        """Chat and like from the Go on, when every worker's viewers are in the room."""
        plan, tasks = self.plan, []
        for v in self.viewers[:plan.chatters]:
            tasks.append(asyncio.create_task(every(plan.chat_interval_s, v.chat, self.quiet, self.deadline,
                                                   self.ctx.result if self.ctx else None)))
            tasks.append(asyncio.create_task(every(plan.like_interval_s, v.like, self.quiet, self.deadline)))
        return tasks

    async def _watch_lag(self) -> None:
        """How late a short timer fires: the generator's own delay, which its timings carry too."""
        while not self.quiet.is_set():
            t0 = time.monotonic()
            await asyncio.sleep(LAG_TICK_S)
            self.lag.add((time.monotonic() - t0 - LAG_TICK_S) * 1000)

    def _open(self) -> int:
        return sum(1 for v in self.viewers if v.ws is not None)

    async def _run_buyers(self, go: Go, records: list[BuyerRecord], offset: float, rng: random.Random) -> None:
        plan = self.plan
        self.buy = BuyContext(Target.parse(plan.url), go.sale_id, go.starts_at_ms, offset, go.per_user_limit,
                              plan.mix, deadline=self.deadline - 5)
        buyers = [Buyer(self.buy, i, rec, random.Random(rng.random())) for i, rec in enumerate(records)]
        tasks = [asyncio.create_task(b.run()) for b in buyers]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=max(1.0, self._left() - 3))
            for t in pending:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _progress(self) -> None:
        assert self.ctx is not None
        while True:
            await asyncio.sleep(PROGRESS_EVERY_S)
            c = self.buy.counters if self.buy else None
            self.pipe.send(Progress(
                index=self.plan.index, viewers_open=self._open(), attempts=c.attempts if c else 0,
                buyers_done=c.done if c else 0, reserved=c.reserved if c else 0, errors=c.errors if c else 0,
                rate_limited=c.rate_limited if c else 0, events=sum(v.events for v in self.viewers),
                chats_sent=self.ctx.result.chats_sent))

    async def _shut_down(self, tasks: list[asyncio.Task[Any]]) -> None:
        if not self.quiet.is_set():
            # Stop talking first and let the last messages arrive (until none came for a while), so
            # deliveries are not cut off, however late they run.
            self.quiet.set()
            until = time.monotonic() + min(DRAIN_MAX_S, max(0.0, self._left() - 10))
            while time.monotonic() < until:
                await asyncio.sleep(0.25)
                if self.ctx is None or time.monotonic() - self.ctx.last_receipt > DRAIN_QUIET_S:
                    break
        if self.ctx is not None:
            self.ctx.stop.set()
        await asyncio.gather(*(v.close() for v in self.viewers))
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 5)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
