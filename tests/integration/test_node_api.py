"""The node's HTTP API in process: every endpoint and every error case.

The app runs with its real lifespan (driven here through the ASGI lifespan
protocol) on a real SQLite file; requests go through httpx's ASGI transport.
Every refused request is held to "nothing changed": the node's answer to
``GET /v1/counters``, its families in memory, and what a second store handle
reads from the file are the same before and after.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

import keepcount
from keepcount.metrics import MAX_VALUE
from keepcount.node import Node, NodeConfig, create_app
from keepcount.openapi import OPENAPI
from keepcount.stores import open_store

pytestmark = pytest.mark.anyio

NODE = "node-1"
INC = "/v1/counters/hits_total/increment"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class Lifespan:
    """Drives an ASGI app's lifespan the way a server does (startup, shutdown)."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.to_app: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.from_app: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    async def __aenter__(self) -> Lifespan:
        scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
        self.task = asyncio.create_task(self.app(scope, self.to_app.get, self.from_app.put))
        await self.to_app.put({"type": "lifespan.startup"})
        assert (await self.from_app.get())["type"] == "lifespan.startup.complete"
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.to_app.put({"type": "lifespan.shutdown"})
        message = await self.from_app.get()
        assert message["type"] == "lifespan.shutdown.complete", message
        await self.task


@dataclass
class Running:
    app: Any
    client: httpx.AsyncClient
    url: str

    @property
    def node(self) -> Node:
        node: Node = self.app.state.node
        return node

    @property
    def registry(self) -> keepcount.Registry:
        assert self.node.registry is not None
        return self.node.registry

    async def wait_ready(self, timeout: float = 10.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            r = await self.client.get("/readyz")
            if r.status_code == 200:
                body: dict[str, Any] = r.json()
                return body
            assert r.status_code == 503, r.text
            assert time.monotonic() < deadline, f"not ready within {timeout} s: {r.text}"
            await asyncio.sleep(0.005)

    async def state(self) -> tuple[Any, ...]:
        """What a refused request must leave as it was."""
        listed = (await self.client.get("/v1/counters")).json()
        families = sorted(f.name for f in self.registry.families())
        return listed, families, stored(self.url)


def stored(url: str, node: str = NODE) -> tuple[dict[str, Any], dict[str, Any]]:
    """The node's families and values as a second store handle reads them from the file."""
    store = open_store(url)
    try:
        snap = store.load(node)
        return {n: (d.kind, d.labelnames) for n, d in snap.families.items()}, snap.values
    finally:
        store.close()


@contextlib.asynccontextmanager
async def serve(
    url: str, *, routes: list[Route] | None = None, raise_errors: bool = True, **kw: Any
) -> AsyncIterator[Running]:
    app = create_app(NodeConfig(node=kw.pop("node", NODE), store=url, **kw), routes=routes or [])
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=raise_errors)
    async with (
        Lifespan(app),
        httpx.AsyncClient(transport=transport, base_url="http://node") as client,
    ):
        yield Running(app, client, url)


@pytest.fixture
def url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/counters.db"


@pytest.fixture
async def node(url: str) -> AsyncIterator[Running]:
    async with serve(url) as running:
        await running.wait_ready()
        yield running


def error_of(r: httpx.Response, status: int, code: str) -> str:
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"] == "application/json"
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, body
    assert body["error"]["code"] == code, body
    assert body["error"]["message"]
    if status == 503:
        assert r.headers["retry-after"].isdigit()
    message: str = body["error"]["message"]
    return message


# -- probes, documents, the happy path ------------------------------------------------


async def test_probes_and_the_openapi_document(node: Running) -> None:
    r = await node.client.get("/healthz")
    assert (r.status_code, r.json()) == (200, {"status": "ok"})
    ready = (await node.client.get("/readyz")).json()
    assert ready["status"] == "ready" and ready["node"] == NODE and ready["epoch"] == 1
    assert ready["restored_series"] == 0 and ready["restore_seconds"] >= 0
    r = await node.client.get("/openapi.json")
    assert r.headers["content-type"] == "application/json"
    assert r.json() == json.loads(json.dumps(OPENAPI))


@pytest.mark.g1
async def test_increment_answers_the_durable_value(node: Running) -> None:
    r = await node.client.post(INC)  # no body: labels {} and by 1
    assert r.status_code == 200, r.text
    assert r.json() == {"node": NODE, "name": "hits_total", "labels": {}, "value": 1,
                        "durable": True}  # fmt: skip
    assert "idempotency-replayed" not in r.headers
    assert stored(node.url)[1] == {"hits_total": {"[]": 1}}, "durable before the answer"

    inc = "/v1/counters/req_total/increment"
    r = await node.client.post(inc, json={"labels": {"status": "200", "route": "/"}, "by": 5})
    assert r.json()["value"] == 5 and r.json()["labels"] == {"route": "/", "status": "200"}
    r = await node.client.post(inc, json={"by": 2, "labels": {"route": "/", "status": "200"}})
    assert r.json()["value"] == 7
    r = await node.client.post(inc, json={"labels": {"route": "/x", "status": "500"}, "by": 0})
    assert r.json()["value"] == 0
    assert stored(node.url)[1]["req_total"] == {'["/","200"]': 7, '["/x","500"]': 0}
    assert stored(node.url)[0]["req_total"] == ("counter", ("route", "status"))

    listed = (await node.client.get("/v1/counters")).json()
    assert listed == {"node": NODE, "counters": [
        {"name": "hits_total", "kind": "counter", "labels": {}, "value": 1},
        {"name": "req_total", "kind": "counter", "labels": {"route": "/", "status": "200"},
         "value": 7},
        {"name": "req_total", "kind": "counter", "labels": {"route": "/x", "status": "500"},
         "value": 0},
    ]}  # fmt: skip
    one = (await node.client.get("/v1/counters/hits_total")).json()
    assert one == {"node": NODE, "counters": [listed["counters"][0]]}


async def test_charset_parameter_and_an_empty_body_with_any_type_are_accepted(
    node: Running,
) -> None:
    r = await node.client.post(INC, content=b'{"by": 3}',
                               headers={"content-type": "Application/JSON; charset=utf-8"})  # fmt: skip
    assert r.status_code == 200 and r.json()["value"] == 3
    r = await node.client.post(INC, content=b"", headers={"content-type": "text/plain"})
    assert r.status_code == 200 and r.json()["value"] == 4


async def test_histograms_are_listed_with_cumulative_buckets(node: Running) -> None:
    h = node.registry.histogram("lat_seconds", "", ["route"], buckets=[0.1, 1])
    for v in (0.05, 0.5, 0.7, 3):
        h.labels(route="/").observe(v)
    await node.registry.commit()
    listed = (await node.client.get("/v1/counters/lat_seconds")).json()
    assert listed["counters"] == [{
        "name": "lat_seconds", "kind": "histogram", "labels": {"route": "/"},
        "value": {"count": 4, "sum": 4.25, "buckets": {"0.1": 1, "1.0": 3, "+Inf": 4}},
    }]  # fmt: skip
    cluster = (await node.client.get("/v1/cluster/counters/lat_seconds")).json()
    assert cluster["counters"][0]["value"] == listed["counters"][0]["value"]
    assert cluster["counters"][0]["nodes"] == {NODE: listed["counters"][0]["value"]}


@pytest.mark.g5
async def test_cluster_totals_sum_every_node_of_the_store(node: Running) -> None:
    await node.client.post(INC, json={"labels": {"r": "a"}, "by": 2})
    with keepcount.open(node.url, node="node-2", flush_interval=None) as other:
        other.counter("hits_total", "", ["r"]).labels("a").inc(5)
        other.counter("hits_total", "", ["r"]).labels("b").inc(1)
        other.commit_sync()
    r = await node.client.get("/v1/cluster/counters")
    assert r.json() == {"counters": [
        {"name": "hits_total", "kind": "counter", "labels": {"r": "a"}, "value": 7,
         "nodes": {"node-1": 2, "node-2": 5}},
        {"name": "hits_total", "kind": "counter", "labels": {"r": "b"}, "value": 1,
         "nodes": {"node-2": 1}},
    ]}  # fmt: skip
    assert (await node.client.get("/v1/cluster/counters/hits_total")).json() == r.json()
    # this node's own view holds only its own series
    assert len((await node.client.get("/v1/counters")).json()["counters"]) == 1


async def test_metrics_in_both_formats(node: Running) -> None:
    await node.client.post(INC, json={"by": 41})
    await node.client.post(INC)
    r = await node.client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    samples = {s.name: s.value for f in text_string_to_metric_families(r.text)
               for s in f.samples}  # fmt: skip
    assert samples["hits_total"] == 42
    r = await node.client.get("/metrics",
                              headers={"accept": "application/openmetrics-text; version=1.0.0"})  # fmt: skip
    assert r.headers["content-type"].startswith("application/openmetrics-text")
    assert "hits_total 42.0" in r.text and r.text.endswith("# EOF\n")


@pytest.mark.g1
async def test_concurrent_increments_share_commits_and_are_all_durable(node: Running) -> None:
    flushes = node.registry.flushes
    rs = await asyncio.gather(*(node.client.post(INC, json={"labels": {"w": str(i % 4)}})
                                for i in range(200)))  # fmt: skip
    assert [r.status_code for r in rs] == [200] * 200
    for w in "0123":
        values = sorted(r.json()["value"] for r in rs if r.json()["labels"]["w"] == w)
        assert values == list(range(1, 51)), "each answer is the value right after it"
    assert stored(node.url)[1]["hits_total"] == {f'["{w}"]': 50 for w in "0123"}
    assert node.registry.flushes - flushes < 200, "concurrent requests share group commits"


# -- idempotency keys ------------------------------------------------------------------


@pytest.mark.g2
async def test_a_retry_with_the_same_key_is_answered_again_and_counted_once(
    node: Running,
) -> None:
    body = {"labels": {"r": "a"}, "by": 3}
    first = await node.client.post(INC, json=body, headers={"idempotency-key": "k-1"})
    assert first.status_code == 200 and "idempotency-replayed" not in first.headers
    again = await node.client.post(INC, json=body, headers={"idempotency-key": "k-1"})
    assert again.status_code == 200 and again.headers["idempotency-replayed"] == "true"
    assert again.json() == first.json() == {"node": NODE, "name": "hits_total",
                                            "labels": {"r": "a"}, "value": 3, "durable": True}  # fmt: skip
    # the same body in another key order is the same request
    r = await node.client.post(INC, content=b'{"by": 3, "labels": {"r": "a"}}',
                               headers={"idempotency-key": "k-1",
                                        "content-type": "application/json"})  # fmt: skip
    assert r.headers["idempotency-replayed"] == "true"
    before = await node.state()
    r = await node.client.post(INC, json={"labels": {"r": "a"}, "by": 4},
                               headers={"idempotency-key": "k-1"})  # fmt: skip
    assert "k-1" in error_of(r, 422, "idempotency_key_reused")
    assert await node.state() == before
    assert stored(node.url)[1]["hits_total"] == {'["a"]': 3}


@pytest.mark.g2
async def test_a_key_is_honoured_by_another_node_of_the_store(url: str, tmp_path: Path) -> None:
    body = {"labels": {"r": "a"}, "by": 3}
    async with serve(url) as one, serve(url, node="node-2") as two:
        await one.wait_ready()
        await two.wait_ready()
        first = await one.client.post(INC, json=body, headers={"idempotency-key": "abc"})
        retry = await two.client.post(INC, json=body, headers={"idempotency-key": "abc"})
        assert retry.status_code == 200 and retry.headers["idempotency-replayed"] == "true"
        assert retry.json() == first.json() and retry.json()["node"] == NODE
        assert stored(url, "node-2")[1].get("hits_total", {}) == {}, "node-2 counted nothing"


@pytest.mark.g6
@pytest.mark.parametrize("key", ["", " ", "a b", "x" * 256, "é".encode("latin-1"), "tab\there"])
async def test_invalid_idempotency_keys_are_400(node: Running, key: str | bytes) -> None:
    before = await node.state()
    r = await node.client.post(INC, json={"by": 1}, headers={"idempotency-key": key})
    error_of(r, 400, "invalid_idempotency_key")
    assert await node.state() == before


async def test_longest_idempotency_key_is_accepted(node: Running) -> None:
    r = await node.client.post(INC, headers={"idempotency-key": "~" * 255})
    assert r.status_code == 200


# -- bad input: 400, 413, 415, 422 ---------------------------------------------------------


@pytest.mark.g6
@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        (b"{", 400, "malformed_json"),
        (b"not json", 400, "malformed_json"),
        (b"[1, 2]", 400, "malformed_json"),
        (b'"by"', 400, "malformed_json"),
        (b"null", 400, "malformed_json"),
        (b"\xff\xfe{}", 400, "malformed_json"),
        (b'{"by": 1} trailing', 400, "malformed_json"),
        (b"[" * 30_000 + b"]" * 30_000, 400, "malformed_json"),
        (b'{"by": 1, "extra": true}', 422, "invalid_input"),
        (b'{"label": {}}', 422, "invalid_input"),
        (b'{"labels": []}', 422, "invalid_input"),
        (b'{"labels": null}', 422, "invalid_input"),
        (b'{"labels": "a=b"}', 422, "invalid_input"),
        (b'{"labels": {"a": 1}}', 422, "invalid_input"),
        (b'{"labels": {"a": null}}', 422, "invalid_input"),
        (b'{"labels": {"a": ["b"]}}', 422, "invalid_input"),
        (b'{"by": -1}', 422, "invalid_amount"),
        (b'{"by": 1.0}', 422, "invalid_amount"),
        (b'{"by": 1.5}', 422, "invalid_amount"),
        (b'{"by": 1e3}', 422, "invalid_amount"),
        (b'{"by": true}', 422, "invalid_amount"),
        (b'{"by": "1"}', 422, "invalid_amount"),
        (b'{"by": null}', 422, "invalid_amount"),
        (b'{"by": NaN}', 422, "invalid_amount"),
        (b'{"by": Infinity}', 422, "invalid_amount"),
        (b'{"by": 9223372036854775808}', 422, "invalid_amount"),
        (b'{"by": 1' + b"0" * 5000 + b"}", 422, "invalid_amount"),
        (b'{"labels": {"__name__": "x"}}', 422, "invalid_input"),
        (b'{"labels": {"a-b": "x"}}', 422, "invalid_input"),
        (b'{"labels": {"1a": "x"}}', 422, "invalid_input"),
        (b'{"labels": {"": "x"}}', 422, "invalid_input"),
        (b'{"labels": {"a": "' + b"x" * 1025 + b'"}}', 422, "invalid_input"),
        (b'{"labels": {"a": "\\ud800"}}', 422, "invalid_input"),
    ],
)
async def test_bad_bodies_are_refused_and_change_nothing(
    node: Running, body: bytes, status: int, code: str
) -> None:
    await node.client.post(INC, json={"labels": {"a": "x"}, "by": 2})
    before = await node.state()
    for path in (INC, "/v1/counters/fresh_total/increment"):  # existing family, and a new one
        r = await node.client.post(path, content=body, headers={"content-type": "application/json"})
        error_of(r, status, code)
        assert await node.state() == before
    assert node.registry.get("fresh_total") is None, "a refused request declares nothing"


@pytest.mark.g6
@pytest.mark.parametrize(
    "name", ["1abc", "a-b", "a.b", "a_bucket", "x_count", "y_sum", "z_created", "n" * 201, "é"]
)
async def test_invalid_metric_names_are_422(node: Running, name: str) -> None:
    before = await node.state()
    r = await node.client.post(f"/v1/counters/{name}/increment", json={"by": 1})
    assert "name" in error_of(r, 422, "invalid_input")
    assert await node.state() == before
    for path in (f"/v1/counters/{name}", f"/v1/cluster/counters/{name}"):
        error_of(await node.client.get(path), 422, "invalid_input")


@pytest.mark.g6
async def test_labels_other_than_the_family_s_are_a_definition_conflict(node: Running) -> None:
    await node.client.post(INC, json={"labels": {"route": "/", "status": "200"}})
    before = await node.state()
    for labels in ({}, {"route": "/"}, {"route": "/", "code": "200"},
                   {"route": "/", "status": "200", "x": "y"}):  # fmt: skip
        r = await node.client.post(INC, json={"labels": labels})
        assert "route" in error_of(r, 422, "definition_conflict")
        assert await node.state() == before


@pytest.mark.g6
async def test_a_histogram_cannot_be_incremented(node: Running) -> None:
    node.registry.histogram("lat_seconds", "", [])
    before = await node.state()
    r = await node.client.post("/v1/counters/lat_seconds/increment")
    assert "histogram" in error_of(r, 422, "definition_conflict")
    assert await node.state() == before


@pytest.mark.g6
async def test_an_increment_past_2_63_is_refused(node: Running) -> None:
    r = await node.client.post(INC, json={"by": MAX_VALUE - 1})
    assert r.json()["value"] == MAX_VALUE - 1
    r = await node.client.post(INC, json={"by": 1})
    assert r.json()["value"] == MAX_VALUE
    before = await node.state()
    for headers in ({}, {"idempotency-key": "over"}):
        r = await node.client.post(INC, json={"by": 1}, headers=headers)
        assert "2**63-1" in error_of(r, 422, "invalid_amount")
        assert await node.state() == before
    assert (await node.client.post(INC, json={"by": 0})).json()["value"] == MAX_VALUE


@pytest.mark.g6
async def test_too_many_label_sets_names_the_limit(url: str) -> None:
    async with serve(url, max_children=2) as node:
        await node.wait_ready()
        for r in ("a", "b"):
            assert (await node.client.post(INC, json={"labels": {"r": r}})).status_code == 200
        before = await node.state()
        r = await node.client.post(INC, json={"labels": {"r": "c"}})
        assert "2" in error_of(r, 422, "too_many_label_sets")
        assert await node.state() == before
        assert (await node.client.post(INC, json={"labels": {"r": "a"}})).json()["value"] == 2


@pytest.mark.g6
@pytest.mark.parametrize("ctype", ["text/plain", "application/x-www-form-urlencoded",
                                   "application/jsonx", "multipart/form-data", None])  # fmt: skip
async def test_bodies_that_are_not_json_typed_are_415(node: Running, ctype: str | None) -> None:
    before = await node.state()
    headers = {} if ctype is None else {"content-type": ctype}
    r = await node.client.post(INC, content=b'{"by": 1}', headers=headers)
    error_of(r, 415, "unsupported_media_type")
    assert await node.state() == before


@pytest.mark.g6
async def test_a_body_over_the_limit_is_413_by_length_and_while_streaming(url: str) -> None:
    async with serve(url, max_body=1024) as node:
        await node.wait_ready()
        await node.client.post(INC)
        before = await node.state()
        big = json.dumps({"labels": {"a": "x" * 1100}}).encode()
        r = await node.client.post(INC, content=big, headers={"content-type": "application/json"})
        error_of(r, 413, "body_too_large")

        sent = 0

        async def chunked() -> AsyncIterator[bytes]:  # no Content-Length: chunked
            nonlocal sent
            for _ in range(1000):
                sent += 100
                yield b" " * 100

        r = await node.client.post(INC, content=chunked(),
                                   headers={"content-type": "application/json"})  # fmt: skip
        assert "content-length" not in r.request.headers
        error_of(r, 413, "body_too_large")
        assert sent < 5000, "refused while reading, not after buffering it all"
        assert await node.state() == before
        # exactly at the limit is fine
        body = b'{"by": 1}'.ljust(1024)
        r = await node.client.post(INC, content=body, headers={"content-type": "application/json"})
        assert r.status_code == 200 and r.json()["value"] == 2


# -- routing errors, internal errors ----------------------------------------------------------


@pytest.mark.g6
async def test_unknown_paths_methods_and_names(node: Running) -> None:
    assert "/nope" in error_of(await node.client.get("/nope"), 404, "not_found")
    r = await node.client.delete("/v1/counters")
    error_of(r, 405, "method_not_allowed")
    assert "GET" in r.headers["allow"]
    error_of(await node.client.get(INC), 405, "method_not_allowed")
    error_of(await node.client.get("/v1/counters/unknown_total"), 404, "not_found")
    error_of(await node.client.get("/v1/cluster/counters/unknown_total"), 404, "not_found")
    assert (await node.client.get("/v1/cluster/counters")).json() == {"counters": []}


@pytest.mark.g6
async def test_an_unexpected_exception_is_a_json_500(url: str) -> None:
    async def boom(request: Request) -> Response:
        raise RuntimeError("a bug")

    async with serve(url, routes=[Route("/boom", boom)], raise_errors=False) as node:
        r = await node.client.get("/boom")
        assert "RuntimeError" in error_of(r, 500, "internal_error")
        assert "a bug" not in r.text, "no internals in the answer"


# -- authorization ------------------------------------------------------------------------------


@pytest.mark.g6
async def test_a_token_guards_writes_only(url: str) -> None:
    async with serve(url, token="s3cret-token") as node:
        await node.wait_ready()
        for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": "s3cret-token"},
                        {"authorization": "Bearer s3cret-token "},
                        {"authorization": "Basic czNjcmV0LXRva2Vu"}):  # fmt: skip
            r = await node.client.post(INC, json={"by": 1}, headers=headers)
            error_of(r, 401, "unauthorized")
            assert r.headers["www-authenticate"] == "Bearer"
        assert stored(url)[1] == {}
        r = await node.client.post(INC, headers={"authorization": "Bearer s3cret-token"})
        assert r.status_code == 200 and r.json()["value"] == 1
        for path in ("/v1/counters", "/v1/cluster/counters", "/metrics", "/readyz"):
            assert (await node.client.get(path)).status_code == 200


# -- readiness, claims, failures -------------------------------------------------------------


@pytest.mark.g3
async def test_not_ready_while_another_process_holds_the_claim(url: str) -> None:
    holder = keepcount.open(url, node=NODE, flush_interval=None)
    holder.counter("hits_total", "", []).inc(10)
    try:
        async with serve(url) as node:
            for _ in range(3):  # the retry loop keeps it unready; health stays fine
                assert (await node.client.get("/healthz")).status_code == 200
                r = await node.client.get("/readyz")
                message = error_of(r, 503, "not_ready")
                await asyncio.sleep(0.05)
            assert "claim" in message
            for call in (node.client.post(INC, json={"by": 1}), node.client.get("/v1/counters"),
                         node.client.get("/v1/cluster/counters"), node.client.get("/metrics")):  # fmt: skip
                error_of(await call, 503, "not_ready")
            # bad input is still bad input while not ready
            error_of(await node.client.post(INC, json={"by": -1}), 422, "invalid_amount")
            holder.close()
            ready = await node.wait_ready()
            assert ready["epoch"] == 2 and ready["restored_series"] == 1
            assert (await node.client.post(INC)).json()["value"] == 11
    finally:
        holder.close()


@pytest.mark.g4
async def test_a_claim_never_released_is_fatal_after_the_timeout(url: str) -> None:
    holder = keepcount.open(url, node=NODE, flush_interval=None)
    fatal: list[str] = []
    try:
        app = create_app(NodeConfig(node=NODE, store=url, claim_timeout=0.3),
                         on_fatal=fatal.append)  # fmt: skip
        node: Node = app.state.node
        async with Lifespan(app):
            deadline = time.monotonic() + 10
            while not fatal:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.01)
            assert node.fatal == fatal[0] and "already claimed" in fatal[0]
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://n") as client:
                assert "cannot serve" in error_of(await client.get("/readyz"), 503, "not_ready")
        assert node.registry is None
    finally:
        holder.close()


@pytest.mark.g6
async def test_a_corrupt_store_is_fatal_and_left_untouched(tmp_path: Path) -> None:
    path = tmp_path / "foreign.db"
    path.write_bytes(b"this is not a keepcount store\n" * 100)
    fatal: list[str] = []
    app = create_app(NodeConfig(node=NODE, store=f"sqlite:///{path}"), on_fatal=fatal.append)
    async with Lifespan(app):
        deadline = time.monotonic() + 10
        while not fatal:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
    assert "not an SQLite database" in fatal[0]
    assert path.read_bytes() == b"this is not a keepcount store\n" * 100


@pytest.mark.g4
async def test_a_fenced_node_turns_unready_and_acknowledges_nothing(node: Running) -> None:
    assert (await node.client.post(INC)).json()["value"] == 1
    path = node.url[len("sqlite:///") :]
    with contextlib.closing(sqlite3.connect(path)) as db:  # a newer incarnation took the id
        db.execute("UPDATE nodes SET epoch = epoch + 1 WHERE node = ?", (NODE,))
        db.commit()
    error_of(await node.client.post(INC), 503, "fenced")
    assert "lost its claim" in error_of(await node.client.get("/readyz"), 503, "not_ready")
    error_of(await node.client.post(INC), 503, "not_ready")
    assert stored(node.url)[1] == {"hits_total": {"[]": 1}}


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A real 2 MiB tmpfs, so the disk really fills up (ENOSPC)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)],
                         capture_output=True, text=True)  # fmt: skip
    assert res.returncode == 0, (
        f"cannot mount a tmpfs for the disk-full test ({res.stderr.strip()}): run the tests as "
        "root (CI does) or in a container with CAP_SYS_ADMIN"
    )
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.g1
async def test_a_full_disk_is_503_and_acknowledges_nothing(small_fs: Path) -> None:
    url = f"sqlite:///{small_fs}/c.db"
    async with serve(url) as node:
        await node.wait_ready()
        assert (await node.client.post(INC, json={"by": 7})).json()["value"] == 7
        filler = small_fs / "filler"
        with filler.open("wb") as f, contextlib.suppress(OSError):  # take every free byte
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        big = {"labels": {"k": "x" * 1000}}
        for i in range(50):  # enough new rows that the write needs new pages
            big["labels"] = {"k": f"{i}" + "x" * 1000}
            r = await node.client.post("/v1/counters/big_total/increment", json=big)
            if r.status_code == 503:
                break
        error_of(r, 503, "store_unavailable")
        keyed = await node.client.post(INC, headers={"idempotency-key": "during-full"})
        error_of(keyed, 503, "store_unavailable")
        assert stored(url)[1]["hits_total"] == {"[]": 7}
        filler.unlink()
        r = await node.client.post(INC, headers={"idempotency-key": "during-full"})
        assert r.status_code == 200, r.text
        assert stored(url)[1]["hits_total"] == {"[]": 8}, "the keyed retry counted once"


@pytest.mark.g1
async def test_shutdown_flushes_and_releases_the_claim(url: str) -> None:
    async with serve(url) as node:
        await node.wait_ready()
        await node.client.post(INC, json={"by": 3})
        node.registry.counter("hits_total").inc(2)  # not committed by anyone
    assert stored(url)[1] == {"hits_total": {"[]": 5}}
    store = open_store(url)
    try:
        (record,) = store.nodes()
        assert record.node == NODE and record.released_at is not None
    finally:
        store.close()
    async with serve(url) as again:
        ready = await again.wait_ready()
        assert ready["epoch"] == 2 and ready["restored_series"] == 1
        assert (await again.client.get("/v1/counters")).json()["counters"][0]["value"] == 5


@pytest.mark.g6
def test_config_is_validated() -> None:
    good = {"node": NODE, "store": "sqlite:///c.db"}
    for bad in ({"node": "bad id"}, {"store": "c.db"}, {"token": ""}, {"token": "a b"},
                {"idempotency_ttl": 0}, {"max_body": 0}, {"flush_interval": 0},
                {"max_children": 0}, {"claim_timeout": -1}):  # fmt: skip
        with pytest.raises(keepcount.InvalidInput):
            NodeConfig(**{**good, **bad})  # type: ignore[arg-type]


def test_a_config_renders_as_the_node_command_line() -> None:
    from keepcount.cli.node import node as command

    configs = [
        NodeConfig(node=NODE, store="sqlite:///c.db"),
        NodeConfig(node=NODE, store="sqlite:///c.db", idempotency_ttl=60.5, max_body=100,
                   flush_interval=0.25, max_children=None, claim_timeout=0,
                   coordinator="etcd://127.0.0.1:2379/ns", claim_ttl=5, advertise="http://x:1",
                   unsafe_ack_before_durable=True),
    ]  # fmt: skip
    for config in configs:
        argv = config.to_argv()
        params = command.make_context("node", argv).params
        params.pop("listen")
        assert NodeConfig(**params) == config, argv
    secret = NodeConfig(node=NODE, store="sqlite:///c.db", token="s3cret")
    assert "s3cret" not in secret.to_argv() and secret.to_env() == {"KEEPCOUNT_TOKEN": "s3cret"}
    with pytest.raises(keepcount.InvalidInput):
        NodeConfig(node=NODE, store="sqlite:///c.db", flush_interval=None).to_argv()
