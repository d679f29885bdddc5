"""A Flask app whose requests keepcount counts durably, in every worker.

Run it from the repository root::

    .venv/bin/gunicorn -w 4 --max-requests 1000 examples.flask_app:app
    curl localhost:8000/items/1
    curl localhost:8000/metrics         # the host's totals, whichever worker answers
    curl localhost:8000/counts          # the same, as JSON

Configured only by ``KEEPCOUNT_STORE`` (default
``sqlite:///example-counters.db``, a file in the current directory) and
``KEEPCOUNT_NODE`` (default ``example-1``), the same for every worker: each
worker takes a slot of that host (``example-1``, ``example-1@1``, ...) and
restores it before it serves.  Kill a worker, recycle them, restart the
server: the totals carry on.
"""

from __future__ import annotations

import os
from typing import Any

from flask import Flask, abort
from werkzeug.middleware.dispatcher import DispatcherMiddleware

import keepcount
from keepcount.wsgi import KeepcountWSGIMiddleware, make_wsgi_app

STORE = os.environ.get("KEEPCOUNT_STORE", "sqlite:///example-counters.db")
NODE = os.environ.get("KEEPCOUNT_NODE", "example-1")

# Opened at import, in each worker: takes a slot of the host and restores it.
# Flushed and given back when the worker exits (--max-requests, SIGTERM).
registry = keepcount.open(STORE, node=NODE)

app = Flask(__name__)
ITEMS = {1: "apple", 2: "pear"}


@app.get("/items/<int:item_id>")
def read_item(item_id: int) -> dict[str, Any]:
    if item_id not in ITEMS:
        abort(404)
    return {"id": item_id, "name": ITEMS[item_id]}


@app.get("/counts")
def counts() -> dict[str, Any]:
    totals = registry.host_totals("http_requests_total")  # every worker's, durable
    return {
        "node": registry.host,
        "worker": registry.node,  # the slot of the worker that answered
        "http_requests_total": [{**t.labels, "value": t.value} for t in totals],
    }


# Each response starts only once its count is durable (durable=True); /metrics
# is not counted.  `app` stays the Flask object, so `flask --app` finds it.
app.wsgi_app = DispatcherMiddleware(  # type: ignore[method-assign]
    KeepcountWSGIMiddleware(app.wsgi_app, registry), {"/metrics": make_wsgi_app(registry)}
)
