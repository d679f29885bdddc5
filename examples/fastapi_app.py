"""A FastAPI app whose requests keepcount counts durably.

Run it from the repository root::

    .venv/bin/uvicorn examples.fastapi_app:app --port 8000
    curl localhost:8000/items/1
    curl localhost:8000/counts          # this node's request counters

The store and node id come from ``KEEPCOUNT_STORE`` (default
``sqlite:///example-counters.db``, a file in the current directory) and
``KEEPCOUNT_NODE`` (default ``example-1``, as in the other example: run one
example at a time, or give each its own node id).  One process per node id: with
several workers, give each its own ``KEEPCOUNT_NODE``.  Stop it and start it
again: the counts carry on from where they were.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, HTTPException

import keepcount
from keepcount.asgi import KeepcountMiddleware

STORE = os.environ.get("KEEPCOUNT_STORE", "sqlite:///example-counters.db")
NODE = os.environ.get("KEEPCOUNT_NODE", "example-1")

# Opened at import, before the app serves: claims the node id and restores its counts.
registry = keepcount.open(STORE, node=NODE)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    yield
    await registry.aclose()  # flush and give the node id back


api = FastAPI(title="keepcount example", lifespan=lifespan)
ITEMS = {1: "apple", 2: "pear"}


@api.get("/items/{item_id}")
async def read_item(item_id: int) -> dict[str, Any]:
    if item_id not in ITEMS:
        raise HTTPException(status_code=404, detail="no such item")
    return {"id": item_id, "name": ITEMS[item_id]}


@api.get("/counts")
async def counts() -> dict[str, Any]:
    family = registry.get("http_requests_total")  # declared by the middleware
    assert family is not None
    return {
        "node": registry.node,
        "http_requests_total": [
            {**dict(zip(family.labelnames, labels, strict=True)), "value": value}
            for labels, value in family.items()
        ],
    }


# Each response starts only once its count is durable (durable=True).
app = KeepcountMiddleware(api, registry)
