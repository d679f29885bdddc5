"""A FastAPI app instrumented the prometheus_client way, with durable values.

The code is what a prometheus_client user writes (module-level metrics, an
HTTP middleware, ``app.mount("/metrics", make_asgi_app())``); only the
import comes from ``keepcount.prometheus`` instead of ``prometheus_client``.
Run it from the repository root, with uvicorn's workers or gunicorn's::

    export KEEPCOUNT_STORE=sqlite:///example-counters.db KEEPCOUNT_NODE=example-1
    .venv/bin/uvicorn --workers 4 examples.prometheus_fastapi_app:app
    .venv/bin/gunicorn -w 4 -k uvicorn_worker.UvicornWorker examples.prometheus_fastapi_app:app
    curl localhost:8000/items/1
    curl localhost:8000/metrics/        # the host's values, whichever worker answers

(``/metrics`` answers 307 to ``/metrics/``, as with prometheus_client's
``make_asgi_app()`` mounted in Starlette; Prometheus follows it.)

``KEEPCOUNT_STORE`` (a store URL) and ``KEEPCOUNT_NODE`` (one id per
machine) are the same for every worker: each worker takes a slot of that
host (``example-1``, ``example-1@1``, ...) on its first count and restores
it.  Kill a worker, restart the server: the counters carry on.  Without the
two variables the app runs on plain in-memory prometheus_client metrics.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI, HTTPException, Request, Response

from keepcount.prometheus import (
    REGISTRY,
    Counter,
    Gauge,
    Histogram,
    Info,
    make_asgi_app,
)

VERSION = "1.4.2"
METRICS_PATH = "/metrics"

REQUESTS = Counter("http_requests_total", "HTTP requests answered", ["method", "route", "status"])
LATENCY = Histogram(
    "http_request_duration_seconds", "Time to build the response", ["method", "route"]
)
# livesum: the sum over the workers alive now; a killed worker's requests
# in flight are not left behind in it.
IN_PROGRESS = Gauge(
    "http_requests_in_progress", "Requests being served", multiprocess_mode="livesum"
)
APP = Info("example_app", "The running app")
APP.info({"version": VERSION})

app = FastAPI(title="keepcount.prometheus example")
ITEMS = {1: "apple", 2: "pear"}


@app.get("/items/{item_id}")
async def read_item(item_id: int) -> dict[str, Any]:
    if item_id not in ITEMS:
        raise HTTPException(status_code=404, detail="no such item")
    return {"id": item_id, "name": ITEMS[item_id]}


@app.get("/items")
async def list_items() -> list[dict[str, Any]]:
    return [{"id": i, "name": name} for i, name in ITEMS.items()]


@app.middleware("http")
async def count_requests(
    request: Request, call_next: Callable[[Request], Awaitable[Response]]
) -> Response:
    if request.url.path in (METRICS_PATH, METRICS_PATH + "/"):
        return await call_next(request)  # scrapes are not counted
    started = time.perf_counter()
    status = 500  # if the app raises, the client gets a 500
    try:
        with IN_PROGRESS.track_inprogress():
            response = await call_next(request)
        status = response.status_code
    finally:
        # The route template (bounded), never the raw path; known once routed.
        route = getattr(request.scope.get("route"), "path", "<unmatched>")
        REQUESTS.labels(request.method, route, str(status)).inc()
        LATENCY.labels(request.method, route).observe(time.perf_counter() - started)
    # Optional: the response starts only once its count is in the store, so
    # a client can hold /metrics against the responses it got.  Without it
    # the background flush writes every second: a kill -9 loses at most the
    # last ~1 s of counts.  Concurrent requests share one store write, and
    # the event loop goes on serving meanwhile.
    await REGISTRY.commit()
    return response


# The host's values: every worker's combined, read from the store.
app.mount(METRICS_PATH, make_asgi_app())
