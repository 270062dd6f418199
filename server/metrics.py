"""Prometheus metrics, served at /metrics.

Each worker process keeps its own; with several workers, set
PROMETHEUS_MULTIPROC_DIR to an empty directory so /metrics aggregates them.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector
from starlette.requests import Request
from starlette.responses import Response

CONNECTIONS = Gauge("livesale_ws_connections", "Open room WebSocket connections", multiprocess_mode="livesum")
CLOSED = Counter("livesale_ws_closed_total",
                 "Room sockets closed by the server, by close code (stalled: a peer that stopped reading, "
                 "dropped without one)", ["code"])
FRAMES = Counter("livesale_ws_frames_total", "Event frames queued to viewers")
REFUSED = Counter("livesale_ws_refused_total", "Room sockets refused at the handshake, by error code", ["error"])
PURCHASES = Counter("livesale_purchases_total", "Purchase attempts by outcome", ["outcome"])
PURCHASE_SECONDS = Histogram("livesale_purchase_seconds", "Time in the reserve script",
                             buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5))
PERSISTED = Counter("livesale_persisted_entries_total", "Sale stream entries written to SQL")


async def metrics(request: Request) -> Response:
    if request.app.state.services.settings.prometheus_multiproc_dir:
        registry = CollectorRegistry()
        MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
