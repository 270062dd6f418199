"""The parent's side of the worker processes: spawn, talk, collect, and always reap."""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import time
from multiprocessing.connection import Connection as Pipe
from multiprocessing.process import BaseProcess
from typing import Any, TypeVar

from load import worker
from load.messages import Failed, Progress, WorkerPlan
from load.pipes import listen

M = TypeVar("M")


class RunError(Exception):
    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.hint = hint


def split(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


class Fleet:
    def __init__(self, deadline: float) -> None:
        self.deadline = deadline  # time.monotonic() by which everything must be over
        self.procs: list[BaseProcess] = []
        self.pipes: list[Pipe] = []
        self.inbox: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()
        self.progress: dict[int, Progress] = {}
        self.phase = "setup"

    def spawn(self, plans: list[WorkerPlan]) -> None:
        ctx = multiprocessing.get_context("spawn")  # no inherited event loop or sockets
        loop = asyncio.get_running_loop()
        for plan in plans:
            mine, theirs = ctx.Pipe()
            proc = ctx.Process(target=worker.main, args=(theirs, plan), name=f"load-worker-{plan.index}",
                               daemon=True)
            proc.start()
            theirs.close()
            self.procs.append(proc)
            self.pipes.append(mine)
            listen(mine, loop, self.inbox, len(self.pipes) - 1)

    def broadcast(self, message: Any) -> None:
        for pipe in self.pipes:
            with contextlib.suppress(OSError, ValueError):
                pipe.send(message)

    async def collect(self, kind: type[M], timeout: float) -> dict[int, M]:
        """One `kind` message from every worker; progress is noted, failures raise RunError."""
        got: dict[int, M] = {}
        end = min(time.monotonic() + timeout, self.deadline)
        while len(got) < len(self.procs):
            try:
                i, message = await asyncio.wait_for(self.inbox.get(), max(0.01, end - time.monotonic()))
            except TimeoutError:
                raise RunError(f"{len(self.procs) - len(got)} worker(s) sent no {kind.__name__} within "
                               f"{timeout:.0f}s (phase {self.phase})") from None
            if isinstance(message, kind):
                got[i] = message
            elif isinstance(message, Progress):
                self.progress[i] = message
            elif isinstance(message, Failed):
                raise RunError(message.message, message.hint)
            elif isinstance(message, EOFError) and i not in got:
                raise RunError(f"worker {i} exited (code {self.procs[i].exitcode}) during {self.phase}")
        return got

    async def reap(self) -> None:
        """Join every worker; terminate, then kill, those that do not leave in time."""
        for proc in self.procs:
            await asyncio.to_thread(proc.join, 10)
            if proc.is_alive():
                proc.terminate()
                await asyncio.to_thread(proc.join, 5)
            if proc.is_alive():
                proc.kill()
                await asyncio.to_thread(proc.join, 5)
        for pipe in self.pipes:
            pipe.close()
        self.procs, self.pipes = [], []
