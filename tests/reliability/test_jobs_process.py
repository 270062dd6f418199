"""`livesale serve` runs the background jobs (persister, sweeper) in a child process of its
own: started with the server, restarted if it dies, stopped with it; and `livesale jobs`."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from load.machine import cmdline
from server.heartbeat import STALE_S
from tests.inventory.support import bought, get_sale, launch, new_shop
from tests.support import REPO, ServerProcess, api_client, bearer, eventually, guest


def children(pid: int) -> list[int]:
    """Every direct child (any thread's), from /proc: load.machine.children reads the main thread's
    children only."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat[stat.rindex(")") + 2:].split()[1]) == pid:
                out.append(int(entry.name))
    return out


def jobs_pids(server: ServerProcess) -> list[int]:
    assert server.proc is not None
    return [p for p in children(server.proc.pid) if "server jobs" in cmdline(p)]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return "server jobs" in cmdline(pid)  # not a reused pid


@pytest.fixture
async def served(data_dir: Path, redis_url: str) -> AsyncIterator[tuple[ServerProcess, httpx.AsyncClient]]:
    with ServerProcess(data_dir, redis_url=redis_url) as srv:
        async with api_client(srv.url) as api:
            yield srv, api


async def persisted(api: httpx.AsyncClient, token: str, order_id: str) -> bool:
    r = await api.get("/api/orders", headers=bearer(token))
    return r.status_code == 200 and any(o["order_id"] == order_id for o in r.json())


async def test_serve_runs_one_jobs_process_that_persists_orders(
        served: tuple[ServerProcess, httpx.AsyncClient]) -> None:
    srv, api = served
    assert len(jobs_pids(srv)) == 1
    shop = await new_shop(api)
    sale = await launch(api, shop, stock=5)
    buyer = await guest(api, "buyer")
    order = await bought(api, buyer, sale["id"])
    await eventually(lambda: persisted(api, buyer.token, order["order_id"]), what="the order in SQL")


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT], ids=["KILL", "TERM", "INT"])
async def test_a_jobs_process_ended_by_any_signal_of_its_own_is_restarted_and_catches_up(
        served: tuple[ServerProcess, httpx.AsyncClient], sig: signal.Signals) -> None:
    """Only serve's own shutdown stops its jobs process: a SIGTERM or SIGINT sent to the jobs
    alone (a stray `kill`, an operator's mistake) is a crash like any other."""
    srv, api = served
    [first] = jobs_pids(srv)
    shop = await new_shop(api)
    sale = await launch(api, shop, stock=5)
    os.kill(first, sig)
    # Purchases do not need the jobs process: they are answered from Redis meanwhile.
    buyer = await guest(api, "buyer")
    order = await bought(api, buyer, sale["id"])
    assert (await get_sale(api, sale["id"]))["reserved"] == 1

    async def restarted() -> list[int]:
        return [p for p in jobs_pids(srv) if p != first and alive(p)]

    await eventually(restarted, timeout=20, what="a new jobs process")
    await eventually(lambda: persisted(api, buyer.token, order["order_id"]), timeout=20,
                     what="the order made while the jobs were down, in SQL")
    assert "background jobs exited" in srv.log()


async def test_stopping_serve_stops_its_jobs_process(data_dir: Path, redis_url: str) -> None:
    srv = ServerProcess(data_dir, redis_url=redis_url).start()
    try:
        [jobs] = jobs_pids(srv)
    finally:
        srv.stop()
    assert not alive(jobs)


async def test_a_killed_serve_takes_its_jobs_process_along(data_dir: Path, redis_url: str) -> None:
    srv = ServerProcess(data_dir, redis_url=redis_url).start()
    [jobs] = jobs_pids(srv)
    assert srv.proc is not None
    os.kill(srv.proc.pid, signal.SIGKILL)  # only serve itself: its child gets the parent-death signal
    srv.proc.wait()
    srv.proc = None

    async def gone() -> bool:
        return not alive(jobs)

    try:
        await eventually(gone, timeout=20, what="the orphaned jobs process to exit")
    finally:
        if alive(jobs):
            os.kill(jobs, signal.SIGKILL)


async def test_healthz_says_whether_a_jobs_process_runs_wherever_it_runs(data_dir: Path, redis_url: str) -> None:
    """With the jobs off in serve, /healthz answers 503 naming `jobs` until a `livesale jobs`
    elsewhere (same settings) beats, and again within heartbeat.STALE_S after it stops."""
    srv = ServerProcess(data_dir, redis_url=redis_url, env={"LIVESALE_BACKGROUND_JOBS": "0"}).start(ready=503)
    jobs: subprocess.Popen[bytes] | None = None
    try:
        assert jobs_pids(srv) == []
        async with api_client(srv.url) as api:
            r = await api.get("/healthz")
            assert r.status_code == 503
            assert r.json() == {"status": "unavailable", "redis": "ok", "database": "ok", "pubsub": "ok",
                                "jobs": "down"}
            jobs = subprocess.Popen([sys.executable, "-m", "server", "jobs", "--log-level", "warning"], cwd=REPO,
                                    env=srv.env, stdin=subprocess.DEVNULL)

            async def health(status: int) -> bool:
                return (await api.get("/healthz")).status_code == status

            await eventually(lambda: health(200), timeout=30, what="healthz 200 once `livesale jobs` runs")
            jobs.terminate()
            assert jobs.wait(20) == 0
            await eventually(lambda: health(503), timeout=STALE_S + 10, what="healthz 503 once it stopped")
    finally:
        if jobs is not None and jobs.poll() is None:
            jobs.kill()
            jobs.wait()
        srv.stop()


def test_jobs_command_needs_the_servers_redis(data_dir: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    out = subprocess.run([sys.executable, "-m", "server", "jobs"], cwd=REPO, capture_output=True, text=True,
                         timeout=60, env={**env, "LIVESALE_DATA_DIR": str(data_dir)})
    assert out.returncode != 0
    assert "REDIS_URL" in out.stderr


async def test_sigterm_stops_serve_in_order(data_dir: Path) -> None:
    """SIGTERM (docker stop, systemctl stop) to a one-worker serve with its embedded engine: the
    web worker, then the jobs process, then the engine stop, and serve exits 0 (not killed by
    the signal, which would leave the children to the parent-death signal all at once)."""
    srv = ServerProcess(data_dir, redis_url=None).start()
    assert srv.proc is not None
    kids = children(srv.proc.pid)
    [jobs] = jobs_pids(srv)
    srv.proc.send_signal(signal.SIGTERM)
    try:
        assert srv.proc.wait(30) == 0, srv.log()
    finally:
        srv.stop()
    assert not alive(jobs)
    for pid in kids:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        assert not cmdline(pid), f"child {pid} ({cmdline(pid)}) outlived serve"
    assert "background jobs exited" not in srv.log()  # stopped, not restarted
