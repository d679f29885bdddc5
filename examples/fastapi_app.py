"""A FastAPI app whose requests keepcount counts durably, in every worker.

Run it from the repository root, with uvicorn's workers or gunicorn's::

    .venv/bin/uvicorn --workers 4 examples.fastapi_app:app
    .venv/bin/gunicorn -w 4 -k uvicorn_worker.UvicornWorker examples.fastapi_app:app
    curl localhost:8000/items/1
    curl localhost:8000/metrics         # the host's totals, whichever worker answers
    curl localhost:8000/counts          # the same, as JSON

Configured only by ``KEEPCOUNT_STORE`` (default
``sqlite:///example-counters.db``, a file in the current directory) and
``KEEPCOUNT_NODE`` (default ``example-1``), the same for every worker: each
worker takes a slot of that host (``example-1``, ``example-1@1``, ...) and
restores it before it serves.  Kill a worker, restart the server: the
totals carry on.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, HTTPException
from starlette.types import Receive, Scope, Send

import keepcount
from keepcount.asgi import KeepcountMiddleware, make_asgi_app

STORE = os.environ.get("KEEPCOUNT_STORE", "sqlite:///example-counters.db")
NODE = os.environ.get("KEEPCOUNT_NODE", "example-1")

# Opened at import, in each worker: takes a slot of the host and restores it.
registry = keepcount.open(STORE, node=NODE)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    yield
    await registry.aclose()  # flush and give the slot back


api = FastAPI(title="keepcount example", lifespan=lifespan)
ITEMS = {1: "apple", 2: "pear"}


@api.get("/items/{item_id}")
async def read_item(item_id: int) -> dict[str, Any]:
    if item_id not in ITEMS:
        raise HTTPException(status_code=404, detail="no such item")
    return {"id": item_id, "name": ITEMS[item_id]}


@api.get("/counts")
async def counts() -> dict[str, Any]:
    # Every worker's counts, durable ones: a store read, so in a thread.
    totals = await asyncio.to_thread(registry.host_totals, "http_requests_total")
    return {
        "node": registry.host,
        "worker": registry.node,  # the slot of the worker that answered
        "http_requests_total": [{**t.labels, "value": t.value} for t in totals],
    }


# Each response starts only once its count is durable (durable=True).
counted = KeepcountMiddleware(api, registry)
metrics = make_asgi_app(registry)


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    """/metrics for the host (not counted); everything else counted."""
    if scope["type"] == "http" and scope["path"] == "/metrics":
        await metrics(scope, receive, send)
    else:
        await counted(scope, receive, send)
