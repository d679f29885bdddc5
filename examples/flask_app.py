"""A Flask app whose requests keepcount counts durably.

Run it from the repository root::

    .venv/bin/flask --app examples/flask_app run --port 5000
    curl localhost:5000/items/1
    curl localhost:5000/counts          # this node's request counters

The store and node id come from ``KEEPCOUNT_STORE`` (default
``sqlite:///example-counters.db``, a file in the current directory) and
``KEEPCOUNT_NODE`` (default ``example-1``, as in the other example: run one
example at a time, or give each its own node id).  One process per node id: with
several worker processes, give each its own ``KEEPCOUNT_NODE`` (threads
share the one registry).  Stop it and start it again: the counts carry on.
"""

from __future__ import annotations

import os
from typing import Any

from flask import Flask, abort

import keepcount
from keepcount.wsgi import KeepcountWSGIMiddleware

STORE = os.environ.get("KEEPCOUNT_STORE", "sqlite:///example-counters.db")
NODE = os.environ.get("KEEPCOUNT_NODE", "example-1")

# Opened at import, before the app serves: claims the node id and restores its
# counts.  It is flushed and released at interpreter exit.
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
    family = registry.get("http_requests_total")  # declared by the middleware
    assert family is not None
    return {
        "node": registry.node,
        "http_requests_total": [
            {**dict(zip(family.labelnames, labels, strict=True)), "value": value}
            for labels, value in family.items()
        ],
    }


# Each response starts only once its count is durable (durable=True); `app`
# stays the Flask object, so `flask --app` finds it.
app.wsgi_app = KeepcountWSGIMiddleware(app.wsgi_app, registry)  # type: ignore[method-assign]
