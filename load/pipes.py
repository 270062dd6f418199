"""Reading a multiprocessing pipe from an asyncio loop."""

from __future__ import annotations

import asyncio
import threading
from multiprocessing.connection import Connection as Pipe
from typing import Any


def listen(pipe: Pipe, loop: asyncio.AbstractEventLoop, inbox: asyncio.Queue[tuple[int, Any]], tag: int) -> None:
    """Hand each message of `pipe` to the loop's `inbox`, from a thread.

    Not loop.add_reader: it makes the descriptor non-blocking, and then a large pickled result
    fails half-written (EAGAIN) in send() or half-read in recv().
    """
    def pump() -> None:
        while True:
            try:
                message: Any = pipe.recv()
            except (EOFError, OSError):
                message = EOFError()
            try:
                loop.call_soon_threadsafe(inbox.put_nowait, (tag, message))
            except RuntimeError:  # the loop is closed: nobody is listening any more
                return
            if isinstance(message, EOFError):
                return

    threading.Thread(target=pump, name=f"pipe-{tag}", daemon=True).start()
