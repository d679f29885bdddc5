"""Fuzz the node against its own OpenAPI document (schemathesis).

schemathesis generates requests for every operation of the document the node
serves (valid ones and, deliberately, invalid ones) and checks each answer:
never a 5xx (the store is healthy, so not even a 503); status codes, content
types, headers and bodies as the document says; invalid input refused with a
4xx.  The node runs as in production, under uvicorn (httptools), in a thread
of the test process, on a real SQLite file.  (Not through schemathesis' ASGI
transport: it ends the app's lifespan after every test item, and a node whose
lifespan ends stops being ready.)

One check is left out: ``positive_data_acceptance`` (every schema-valid
request answered 2xx).  The document cannot say that a counter's label names
are fixed by its first increment: a later increment of the same name with
other label names is a valid request by the schema and a 422
(``definition_conflict``) by design.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
import uvicorn
from hypothesis import HealthCheck, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance

from keepcount.node import NodeConfig, create_app
from keepcount.openapi import OPENAPI
from keepcount.stores import open_store

pytestmark = pytest.mark.g6
MAX_EXAMPLES = 300  # per operation and phase: about 10 s for the module


def http_get(host: str, port: int, path: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(host, port, timeout=5)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


@pytest.fixture(scope="module")
def base_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One node for the module, served by uvicorn in a thread; stopped (flushed,
    claim released) at the end."""
    url = f"sqlite:///{tmp_path_factory.mktemp('fuzz')}/counters.db"
    app = create_app(NodeConfig(node="fuzz-1", store=url))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, http="httptools", lifespan="on",
                                           access_log=False, log_level="warning"))  # fmt: skip
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    while True:
        assert thread.is_alive() and time.monotonic() < deadline, "the node did not turn ready"
        with contextlib.suppress(OSError):
            if http_get("127.0.0.1", port, "/readyz")[0] == 200:
                break
        time.sleep(0.005)
    _, served = http_get("127.0.0.1", port, "/openapi.json")
    assert json.loads(served) == schema.raw_schema, "fuzzing the document the node serves"
    yield base
    server.should_exit = True
    thread.join(30)
    sock.close()
    assert not thread.is_alive()
    store = open_store(url)
    try:
        (record,) = store.nodes()
        assert record.released_at is not None, "the claim was released at shutdown"
    finally:
        store.close()


schema = schemathesis.openapi.from_dict(json.loads(json.dumps(OPENAPI)))


@schema.parametrize()
@settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
def test_every_answer_conforms_to_the_document(case: Any, base_url: str) -> None:
    case.call_and_validate(base_url=base_url, excluded_checks=[positive_data_acceptance])


def test_after_fuzzing_the_node_still_serves(base_url: str) -> None:
    host, port = base_url.removeprefix("http://").split(":")
    assert http_get(host, int(port), "/readyz")[0] == 200
    listed = json.loads(http_get(host, int(port), "/v1/counters")[1])
    assert listed["node"] == "fuzz-1"
    assert all(s["kind"] == "counter" and s["value"] >= 0 for s in listed["counters"])
