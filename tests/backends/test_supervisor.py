"""server.backends.supervisor.Supervised, through the embedded engine: a killed Valkey is started again by
its watchdog with its data (the AOF), and stop() leaves nothing running. (The jobs process, the
other supervised child, is tests/reliability/test_jobs_process.py's.)"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import redis

from load.servers import free_port
from server.backends.embedded_valkey import EmbeddedValkey


def answers(url: str) -> bool:
    client = redis.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1)
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


def test_a_killed_engine_is_restarted_with_its_data(tmp_path: Path) -> None:
    engine = EmbeddedValkey(tmp_path, port=free_port())
    url = engine.start(supervise=True)
    try:
        client = redis.Redis.from_url(url)
        client.set("kept", "yes")
        client.close()  # answered: on disk (appendfsync always), so it survives the kill at once
        assert engine.process is not None
        first = engine.process.pid
        os.kill(first, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while not (engine.restarts == 1 and answers(url)):
            assert time.monotonic() < deadline, "the engine was not restarted within 30 s"
            time.sleep(0.1)
        assert engine.process is not None and engine.process.pid != first
        client = redis.Redis.from_url(url)
        assert client.get("kept") == b"yes"
        client.close()
    finally:
        engine.stop()
    assert engine.process is None
    assert not answers(url)
