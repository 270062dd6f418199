"""The `livesale` command: serve, jobs, demo, reconcile."""

from __future__ import annotations

import asyncio
import logging
import secrets
import signal
from typing import TYPE_CHECKING

import click
import uvicorn

from server.backends.embedded_valkey import EmbeddedValkey
from server.backends.open_files import raise_limit
from server.backends.uvicorn_protocols import KEEP_ALIVE_S, HttpProtocol, WebSocketProtocol
from server.config import Settings, load_settings
from server.errors import ConfigError
from server.jobs import JobsProcess
from server.logs import log_config
from server.rooms.protocol import MAX_FRAME_BYTES

if TYPE_CHECKING:
    from server.inventory.reconcile import Report


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """livesale: a live-stream shopping server.

    Settings come from the environment: LIVESALE_DATA_DIR (default ./var),
    REDIS_URL (default: an embedded Valkey under the data dir), DATABASE_URL
    (default: SQLite under the data dir), LIVESALE_SECRET_KEY (default: a
    random key kept in the data dir). See the README for the full list.
    """


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True, envvar="LIVESALE_HOST",
              help="Address to bind (env LIVESALE_HOST).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535), envvar="LIVESALE_PORT",
              help="Port to bind (env LIVESALE_PORT).")
@click.option("--workers", default=1, show_default=True, type=click.IntRange(1, 64), envvar="LIVESALE_WORKERS",
              help="Worker processes; they share Redis, so rooms and sales span them (env LIVESALE_WORKERS).")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["critical", "error", "warning", "info", "debug"]), help="Log level.")
def serve(host: str, port: int, workers: int, log_level: str) -> None:
    """Run the HTTP and WebSocket server, and its background jobs in a process of their own."""
    settings = load_settings()  # also creates the data dir and the secret key before workers race for them
    _open_files(settings)
    embedded: EmbeddedValkey | None = None
    jobs: JobsProcess | None = None
    # SIGTERM as SystemExit: the `finally` below then stops the jobs and the engine in order,
    # also when it comes during start-up, and with one worker, where uvicorn ends by re-raising
    # SIGTERM under the handler it found.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        if settings.redis_url is None:
            # One engine for all workers and the jobs process, owned by this parent process; they
            # find it by the data dir (server.wiring.redis_url).
            embedded = EmbeddedValkey(settings.data_dir, binary=settings.redis_server_bin)
            click.echo(f"livesale: embedded Valkey at {embedded.start(supervise=True)} (data in {embedded.dir})")
        from server.wiring import check_redis, ensure_schema

        asyncio.run(ensure_schema(settings))
        try:
            asyncio.run(check_redis(settings))
        except ConfigError as exc:
            raise click.ClickException(str(exc)) from None
        if settings.background_jobs:
            jobs = JobsProcess(log_level)
            jobs.start()
        uvicorn.run("server.app:create_app", factory=True, host=host, port=port, workers=workers,
                    log_level=log_level, log_config=log_config(), proxy_headers=True, server_header=False,
                    lifespan="on",
                    # httptools and websockets with the limits uvicorn lacks (uvicorn_protocols.py).
                    http=HttpProtocol, ws=WebSocketProtocol, timeout_keep_alive=KEEP_ALIVE_S,
                    # Frames over 4 KiB are closed with 1009; no per-message deflate, whose
                    # zlib state would cost more memory per viewer than everything else.
                    ws_max_size=MAX_FRAME_BYTES, ws_per_message_deflate=False,
                    ws_ping_interval=20, ws_ping_timeout=20, timeout_graceful_shutdown=5)
    finally:
        if jobs is not None:
            jobs.stop()
        if embedded is not None:
            embedded.stop()


def _open_files(settings: Settings) -> None:
    """Raise the open-file limit (the workers and the jobs process inherit it) and say whether
    it holds the connection caps."""
    from server.app import edge_limits

    limit = raise_limit()
    limits, warning = edge_limits(settings)
    click.echo(f"livesale: open-file limit {limit}; at most {limits.per_process} connections per process, "
               f"{limits.per_address} per address")
    if warning:
        click.echo(f"livesale: warning: {warning}", err=True)


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(0)


@main.command("jobs")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["critical", "error", "warning", "info", "debug"]), help="Log level.")
@click.option("--parent", type=int, default=None, hidden=True, help="`serve`'s pid: die with it.")
def jobs_command(log_level: str, parent: int | None) -> None:
    """Run the background jobs (orders to SQL, order expiry, sale start and end, late payment
    captures) without serving.

    `serve` starts them itself; run this where LIVESALE_BACKGROUND_JOBS=0 is set on the
    servers. It never starts an engine: it uses REDIS_URL, or the embedded one a running
    `serve` has for the same data dir.
    """
    from server.jobs import follow_parent, run_jobs
    from server.wiring import redis_url

    logging.basicConfig(level=log_level.upper(), format="%(levelname)s:     %(name)s: %(message)s")
    settings = load_settings()
    raise_limit()
    try:
        url = redis_url(settings)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    if parent is not None:
        follow_parent(parent)
    raise SystemExit(asyncio.run(run_jobs(settings, url)))


@main.command()
@click.option("--username", default="demo-host", show_default=True, help="The demo host's username.")
@click.option("--base-url", default="http://127.0.0.1:8000", show_default=True,
              help="Where you will open the pages.")
def demo(username: str, base_url: str) -> None:
    """Create a demo host with a room and three products, and print where to log in."""
    from server.demo import create_demo

    settings = load_settings()
    password = secrets.token_urlsafe(9)
    try:
        room_id = asyncio.run(create_demo(settings, username, password))
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    base = base_url.rstrip("/")
    click.echo(f"""Demo ready.
  Host console : {base}/console
  Viewer room  : {base}/rooms/{room_id}
  Log in as    : {username} / {password}
Start the server with `livesale serve` if it is not running.""")


@main.command()
@click.argument("sale_id")
def reconcile(sale_id: str) -> None:
    """Compare a sale's stock and orders in Redis with SQL; exit 1 on any difference."""
    try:
        report = asyncio.run(_reconcile(load_settings(), sale_id))
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    for line in report.lines():
        click.echo(line)
    raise SystemExit(0 if report.ok else 1)


async def _reconcile(settings: Settings, sale_id: str) -> Report:
    from server.backends.redis_client import close, make_redis
    from server.backends.sql import make_engine, make_sessionmaker
    from server.inventory.reconcile import reconcile
    from server.inventory.stock import Stock
    from server.wiring import redis_url

    redis = make_redis(redis_url(settings), 4)
    db_engine = make_engine(settings.database_url)
    stock = Stock(redis, settings.deployment)
    try:
        return await reconcile(stock, make_sessionmaker(db_engine), sale_id)
    finally:
        stock.disconnect()
        await close(redis)
        await db_engine.dispose()


if __name__ == "__main__":
    main()
