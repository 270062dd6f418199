"""The ceiling for the purchase benchmark: a bare Starlette JSON endpoint.

It reads the same request (bearer header, Idempotency-Key, JSON body) and
answers a JSON body of about the purchase's size, with no auth, no Redis and no
database, served by uvicorn with the same settings as `livesale serve`. Whatever
the purchase costs beyond this is the application's own cost.

Run: python -m load.baseline_app --port 8100 [--workers N]
"""

from __future__ import annotations

import argparse
import asyncio
import time

import msgspec
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from server.backends.uvicorn_protocols import KEEP_ALIVE_S, HttpProtocol

_encode = msgspec.json.Encoder().encode


async def buy(request: Request) -> Response:
    body = msgspec.json.decode(await request.body())
    key = request.headers.get("idempotency-key", "")
    now = int(time.time() * 1000)
    out = {"order_id": "ord_" + key[:40].ljust(40, "x"), "sale_id": request.path_params["sale_id"],
           "status": "reserved", "quantity": body.get("quantity", 1), "price_cents": 999,
           "total_cents": 999 * body.get("quantity", 1), "pay_by": "2030-01-01T00:00:00Z",
           "created_at": "2030-01-01T00:00:00Z", "remaining": now % 1000}
    return Response(_encode(out), status_code=201, media_type="application/json")


async def healthz(request: Request) -> Response:
    return Response(b'{"status":"ok"}', media_type="application/json")


app = Starlette(routes=[Route("/api/sales/{sale_id}/purchase", buy, methods=["POST"]),
                        Route("/healthz", healthz, methods=["GET"])])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8100)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--http", choices=["livesale", "httptools", "h11"], default="livesale",
                        help="livesale's protocol (as `serve` runs), or one of uvicorn's own, to compare")
    args = parser.parse_args()
    # The same uvicorn settings as server/cli.py `serve` (the WebSocket ones do not apply here).
    http: type[asyncio.Protocol] | str = HttpProtocol if args.http == "livesale" else args.http
    uvicorn.run("load.baseline_app:app", host=args.host, port=args.port, workers=args.workers, log_level="warning",
                proxy_headers=True, server_header=False, lifespan="on", timeout_graceful_shutdown=5,
                http=http, timeout_keep_alive=KEEP_ALIVE_S)


if __name__ == "__main__":
    main()
