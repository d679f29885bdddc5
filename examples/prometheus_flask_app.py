"""A Flask app instrumented the prometheus_client way, with durable values.

The code is what a prometheus_client user writes (module-level metrics,
request hooks, ``make_wsgi_app()`` on ``/metrics``); only the import comes
from ``keepcount.prometheus`` instead of ``prometheus_client``.  Run it from
the repository root::

    KEEPCOUNT_STORE=sqlite:///example-counters.db KEEPCOUNT_NODE=example-1 \\
        .venv/bin/gunicorn -w 4 --max-requests 1000 examples.prometheus_flask_app:app
    curl localhost:8000/items/1
    curl localhost:8000/metrics         # the host's values, whichever worker answers

``KEEPCOUNT_STORE`` (a store URL) and ``KEEPCOUNT_NODE`` (one id per
machine) are the same for every worker: each worker takes a slot of that
host (``example-1``, ``example-1@1``, ...) on its first count and restores
it.  Kill a worker, recycle them, restart the server: the counters carry
on.  Without the two variables the app runs on plain in-memory
prometheus_client metrics.
"""

from __future__ import annotations

import time
from typing import Any

from flask import Flask, Response, abort, g, request
from werkzeug.middleware.dispatcher import DispatcherMiddleware

from keepcount.prometheus import (
    REGISTRY,
    Counter,
    Gauge,
    Histogram,
    Info,
    make_wsgi_app,
)

VERSION = "1.4.2"

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

app = Flask(__name__)
ITEMS = {1: "apple", 2: "pear"}


@app.get("/items/<int:item_id>")
@IN_PROGRESS.track_inprogress()
def read_item(item_id: int) -> dict[str, Any]:
    if item_id not in ITEMS:
        abort(404)
    return {"id": item_id, "name": ITEMS[item_id]}


@app.get("/items")
@IN_PROGRESS.track_inprogress()
def list_items() -> list[dict[str, Any]]:
    return [{"id": i, "name": name} for i, name in ITEMS.items()]


@app.before_request
def start_timer() -> None:
    g.started = time.perf_counter()


@app.after_request
def count_request(response: Response) -> Response:
    # The route template (bounded), never the raw path.
    route = request.url_rule.rule if request.url_rule is not None else "<unmatched>"
    REQUESTS.labels(request.method, route, str(response.status_code)).inc()
    LATENCY.labels(request.method, route).observe(time.perf_counter() - g.started)
    # Optional: the response is sent only once its count is in the store, so
    # a client can hold /metrics against the responses it got.  Without it
    # the background flush writes every second: a kill -9 loses at most the
    # last ~1 s of counts.  Concurrent requests share one store write.
    REGISTRY.commit_sync()
    return response


# /metrics is the host's: every worker's values combined, read from the
# store.  It bypasses Flask, so it is not counted.
app.wsgi_app = DispatcherMiddleware(app.wsgi_app, {"/metrics": make_wsgi_app()})  # type: ignore[method-assign]
