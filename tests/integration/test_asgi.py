"""The ASGI middleware on real SQLite files: labels, errors, durability, the bound, failures."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, HTTPException
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Mount, Route

import keepcount
from keepcount import Fenced, StoreUnavailable
from keepcount.asgi import KeepcountMiddleware, Message, Receive, Scope, Send
from keepcount.metrics import HistogramValue, decode_label_key
from keepcount.registry import Registry
from keepcount.stores import open_store
from keepcount.stores.base import FamilyDef, KeyRecord, SeriesRow
from keepcount.stores.sqlite import SQLiteStore

EXAMPLE = Path(__file__).parents[2] / "examples" / "fastapi_app.py"


class FailingStore(SQLiteStore):
    """A real SQLite store whose writes fail while ``fail`` is set."""

    fail: Exception | None = None

    def write(self, node: str, epoch: int, families: Sequence[FamilyDef],
              series: Sequence[SeriesRow], keys: Sequence[KeyRecord] = ()) -> None:  # fmt: skip
        if self.fail is not None:
            raise self.fail
        super().write(node, epoch, families, series, keys)


@pytest.fixture
def freg(tmp_path: Path) -> Iterator[Registry]:
    r = Registry(FailingStore(tmp_path / "c.db"), "node-1", flush_interval=None)
    yield r
    r.store.fail = None  # type: ignore[attr-defined]
    if not r.closed:
        with contextlib.suppress(Fenced):
            r.close()


def stored(url: str, name: str) -> dict[tuple[str, ...], Any]:
    """What a second, independent handle on the store reads: only durable values."""
    store = open_store(url)
    try:
        values = store.load("node-1").values.get(name, {})
    finally:
        store.close()
    return {decode_label_key(k): v for k, v in values.items()}


def fastapi_app() -> FastAPI:
    api = FastAPI()

    @api.get("/items/{item_id}")
    async def item(item_id: int) -> dict[str, int]:
        if item_id == 404:
            raise HTTPException(status_code=404)
        return {"id": item_id}

    @api.get("/unavailable")
    async def unavailable() -> Response:
        return PlainTextResponse("down", status_code=503)

    @api.get("/boom")
    async def boom() -> None:
        raise RuntimeError("boom")

    return api


def client(app: Any, *, raise_app_exceptions: bool = True) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=raise_app_exceptions)
    return httpx.AsyncClient(transport=transport, base_url="http://test")


def get(app: Any, *paths: str, method: str = "GET") -> list[httpx.Response]:
    async def main() -> list[httpx.Response]:
        async with client(app) as c:
            return [await c.request(method, p) for p in paths]

    return asyncio.run(main())


def http_scope(method: str = "GET", path: str = "/") -> Scope:
    return {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
        "method": method, "scheme": "http", "path": path, "raw_path": path.encode(),
        "query_string": b"", "root_path": "", "headers": [],
        "server": ("test", 80), "client": ("127.0.0.1", 5000),
    }  # fmt: skip


async def drive(
    app: Any, scope: Scope, on_start: Callable[[Message], None] | None = None
) -> list[Message]:
    """Run one request through ``app`` as a server would; ``on_start`` sees the
    start message at the moment the server receives it."""
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        if message["type"] == "http.response.start" and on_start is not None:
            on_start(message)
        sent.append(message)

    await app(scope, receive, send)
    return sent


def plain_app(status: int = 200, *, raise_before: bool = False, raise_after: bool = False) -> Any:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if raise_before:
            raise RuntimeError("before the response")
        await send({"type": "http.response.start", "status": status, "headers": []})
        if raise_after:
            raise RuntimeError("in the middle of the body")
        await send({"type": "http.response.body", "body": b"ok"})

    return app


# -- labels ------------------------------------------------------------------------


def test_two_item_ids_count_as_one_route_template(reg: Registry, db_url: str) -> None:
    app = KeepcountMiddleware(fastapi_app(), reg)
    responses = get(app, "/items/1", "/items/2")
    assert [r.status_code for r in responses] == [200, 200]
    series = dict(reg.get("http_requests_total").items())  # type: ignore[union-attr]
    assert series == {("GET", "/items/{item_id}", "200"): 2}
    hist = reg.histogram("http_request_duration_seconds", "", ["method", "route"])
    assert hist.labels("GET", "/items/{item_id}").value.count == 2


def test_status_labels_and_unmatched_routes(reg: Registry) -> None:
    app = KeepcountMiddleware(fastapi_app(), reg)
    codes = [r.status_code for r in get(app, "/items/404", "/items/x", "/no/such/path")]
    assert codes == [404, 422, 404]
    series = dict(reg.get("http_requests_total").items())  # type: ignore[union-attr]
    assert series == {
        ("GET", "/items/{item_id}", "404"): 1,
        ("GET", "/items/{item_id}", "422"): 1,
        ("GET", "<unmatched>", "404"): 1,
    }
    assert dict(reg.get("http_request_errors_total").items()) == {}  # type: ignore[union-attr]


def test_unknown_methods_are_other(reg: Registry) -> None:
    app = KeepcountMiddleware(fastapi_app(), reg)
    get(app, "/items/1", method="BREW")
    asyncio.run(drive(app, http_scope("get", "/items/1")))  # methods are case-sensitive
    series = dict(reg.get("http_requests_total").items())  # type: ignore[union-attr]
    assert series == {("OTHER", "/items/{item_id}", "405"): 2}


def test_mounted_routes_get_their_full_template(reg: Registry) -> None:
    async def hello(request: Request) -> Response:
        return PlainTextResponse("hi")

    inner = Starlette(routes=[Route("/p/{b:int}", hello)])
    app = Starlette(routes=[Mount("/m/{a}", routes=[Mount("/sub", app=inner)])])
    get(KeepcountMiddleware(app, reg), "/m/x/sub/p/1", "/m/y/sub/p/2")
    series = dict(reg.get("http_requests_total").items())  # type: ignore[union-attr]
    assert series == {("GET", "/m/{a}/sub/p/{b}", "200"): 2}


def test_route_for_names_routes_of_other_frameworks(reg: Registry) -> None:
    app = KeepcountMiddleware(
        plain_app(), reg, route_for=lambda scope: "/known" if scope["path"] == "/a" else None
    )
    get(app, "/a", "/b")
    series = dict(reg.get("http_requests_total").items())  # type: ignore[union-attr]
    assert series == {("GET", "/known", "200"): 1, ("GET", "<unmatched>", "200"): 1}


def test_prefix_names_the_families(reg: Registry) -> None:
    get(KeepcountMiddleware(plain_app(), reg, prefix="api"), "/")
    assert reg.get("api_requests_total") is not None
    assert reg.get("api_request_errors_total") is not None
    assert reg.get("api_request_duration_seconds") is not None


# -- errors ------------------------------------------------------------------------


def test_5xx_responses_are_errors(reg: Registry, db_url: str) -> None:
    get(KeepcountMiddleware(fastapi_app(), reg), "/unavailable")
    assert stored(db_url, "http_requests_total") == {("GET", "/unavailable", "503"): 1}
    assert stored(db_url, "http_request_errors_total") == {("GET", "/unavailable"): 1}


def test_an_exception_before_the_response_counts_as_500_and_is_reraised(
    reg: Registry, db_url: str
) -> None:
    app = KeepcountMiddleware(plain_app(raise_before=True), reg)
    with pytest.raises(RuntimeError, match="before the response"):
        asyncio.run(drive(app, http_scope()))
    # Durable before the exception propagates (to the handler that answers 500).
    assert stored(db_url, "http_requests_total") == {("GET", "<unmatched>", "500"): 1}
    assert stored(db_url, "http_request_errors_total") == {("GET", "<unmatched>"): 1}


def test_fastapi_exception_counted_once(reg: Registry) -> None:
    # Starlette's error middleware sends the 500, then re-raises: one request, one error.
    app = KeepcountMiddleware(fastapi_app(), reg)

    async def main() -> int:
        async with client(app, raise_app_exceptions=False) as c:
            return (await c.get("/boom")).status_code

    assert asyncio.run(main()) == 500
    assert dict(reg.get("http_requests_total").items()) == {("GET", "/boom", "500"): 1}  # type: ignore[union-attr]
    assert dict(reg.get("http_request_errors_total").items()) == {("GET", "/boom"): 1}  # type: ignore[union-attr]


def test_added_with_add_middleware(reg: Registry, db_url: str) -> None:
    # Inside Starlette's error middleware: the exception passes through it first.
    api = fastapi_app()
    api.add_middleware(KeepcountMiddleware, registry=reg)

    async def main() -> list[int]:
        async with client(api, raise_app_exceptions=False) as c:
            return [(await c.get(p)).status_code for p in ("/items/1", "/boom")]

    assert asyncio.run(main()) == [200, 500]
    assert stored(db_url, "http_requests_total") == {
        ("GET", "/items/{item_id}", "200"): 1,
        ("GET", "/boom", "500"): 1,
    }
    assert stored(db_url, "http_request_errors_total") == {("GET", "/boom"): 1}


def test_an_exception_after_the_response_started_is_an_error_of_that_request(
    reg: Registry,
) -> None:
    app = KeepcountMiddleware(plain_app(raise_after=True), reg)
    with pytest.raises(RuntimeError, match="middle"):
        asyncio.run(drive(app, http_scope()))
    assert dict(reg.get("http_requests_total").items()) == {("GET", "<unmatched>", "200"): 1}  # type: ignore[union-attr]
    assert dict(reg.get("http_request_errors_total").items()) == {("GET", "<unmatched>"): 1}  # type: ignore[union-attr]


def test_an_app_that_never_answers_counts_as_500(reg: Registry) -> None:
    async def silent(scope: Scope, receive: Receive, send: Send) -> None:
        return None

    asyncio.run(drive(KeepcountMiddleware(silent, reg), http_scope()))
    assert dict(reg.get("http_requests_total").items()) == {("GET", "<unmatched>", "500"): 1}  # type: ignore[union-attr]


# -- durability --------------------------------------------------------------------


@pytest.mark.g1
def test_durable_before_the_response_starts(reg: Registry, db_url: str) -> None:
    app = KeepcountMiddleware(fastapi_app(), reg)
    seen: list[dict[tuple[str, ...], Any]] = []

    def on_start(message: Message) -> None:
        seen.append(stored(db_url, "http_requests_total"))

    asyncio.run(drive(app, http_scope(path="/items/7"), on_start))
    asyncio.run(drive(app, http_scope(path="/items/8"), on_start))
    assert seen == [
        {("GET", "/items/{item_id}", "200"): 1},
        {("GET", "/items/{item_id}", "200"): 2},
    ]
    raw = stored(db_url, "http_request_duration_seconds")[("GET", "/items/{item_id}")]
    assert HistogramValue.decode(raw, len(keepcount.DEFAULT_BUCKETS)).count == 2


@pytest.mark.g1
def test_concurrent_requests_are_all_durable(reg: Registry, db_url: str) -> None:
    app = KeepcountMiddleware(fastapi_app(), reg)

    async def main() -> None:
        async with client(app) as c:
            responses = await asyncio.gather(*(c.get(f"/items/{i}") for i in range(50)))
        assert all(r.status_code == 200 for r in responses)

    asyncio.run(main())
    assert stored(db_url, "http_requests_total") == {("GET", "/items/{item_id}", "200"): 50}
    assert reg.flushes <= 50  # concurrent responses may share a flush, never need more


def test_bounded_async_lets_at_most_max_pending_responses_start_undurable(
    reg: Registry, db_url: str
) -> None:
    app = KeepcountMiddleware(fastapi_app(), reg, durable=False, max_pending=3)
    durable_after_each = []
    for i in range(8):
        get(app, f"/items/{i}")
        value = stored(db_url, "http_requests_total").get(("GET", "/items/{item_id}", "200"), 0)
        durable_after_each.append(value)
        assert (i + 1) - value <= 3, "more than max_pending answered responses not durable"
    # The 4th and 8th responses would have been the 4th undurable one: they waited.
    assert durable_after_each == [0, 0, 0, 4, 4, 4, 4, 8]
    assert app.bound.pending == 0


@pytest.mark.g6
def test_max_pending_must_be_a_non_negative_int(reg: Registry) -> None:
    with pytest.raises(keepcount.InvalidInput, match="max_pending"):
        KeepcountMiddleware(plain_app(), reg, durable=False, max_pending=-1)


# -- commit failures -----------------------------------------------------------------


@pytest.mark.g1
def test_a_failed_commit_replaces_the_response_with_503(freg: Registry) -> None:
    app = KeepcountMiddleware(fastapi_app(), freg)
    store: FailingStore = freg.store  # type: ignore[assignment]
    store.fail = StoreUnavailable("disk full")
    [response] = get(app, "/items/1")
    assert response.status_code == 503
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert error["code"] == "store_unavailable"
    assert "disk full" in error["message"]
    assert "id" not in response.text  # the app's body went nowhere
    assert stored(store.url, "http_requests_total") == {}
    # The count (with the app's status) stays in memory; the next commit writes it.
    store.fail = None
    freg.commit_sync()
    assert stored(store.url, "http_requests_total") == {("GET", "/items/{item_id}", "200"): 1}


@pytest.mark.g4
def test_a_fenced_registry_answers_503_fenced(freg: Registry) -> None:
    app = KeepcountMiddleware(fastapi_app(), freg)
    freg.store.fail = Fenced("a newer incarnation took node-1")  # type: ignore[attr-defined]
    for _ in range(2):  # and it stays that way
        [response] = get(app, "/items/1")
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "fenced"


def test_bounded_async_failure_only_hits_the_response_that_waits(freg: Registry) -> None:
    app = KeepcountMiddleware(fastapi_app(), freg, durable=False, max_pending=1)
    freg.store.fail = StoreUnavailable("store down")  # type: ignore[attr-defined]
    assert [r.status_code for r in get(app, "/items/1", "/items/2")] == [200, 503]


@pytest.mark.g1
def test_a_failed_commit_after_an_exception_is_noted_on_it(freg: Registry) -> None:
    freg.store.fail = StoreUnavailable("store down")  # type: ignore[attr-defined]
    app = KeepcountMiddleware(plain_app(raise_before=True), freg)
    with pytest.raises(RuntimeError) as info:
        asyncio.run(drive(app, http_scope()))
    assert any("not durable" in note for note in info.value.__notes__)


# -- other scopes ----------------------------------------------------------------------


def test_lifespan_and_websocket_pass_through_untouched(reg: Registry) -> None:
    seen: list[tuple[str, Receive, Send]] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append((scope["type"], receive, send))
        if scope["type"] == "lifespan":
            await receive()
            await send({"type": "lifespan.startup.complete"})

    async def receive() -> Message:
        return {"type": "lifespan.startup"}

    out: list[Message] = []

    async def send(message: Message) -> None:
        out.append(message)

    mw = KeepcountMiddleware(app, reg)
    asyncio.run(mw({"type": "lifespan", "asgi": {"version": "3.0"}}, receive, send))
    asyncio.run(mw({"type": "websocket", "path": "/ws", "headers": []}, receive, send))
    assert [(t, r) for t, r, _ in seen] == [("lifespan", receive), ("websocket", receive)]
    assert seen[1][2] is send  # websockets untouched; lifespan's send flushes at shutdown
    assert out == [{"type": "lifespan.startup.complete"}]
    assert len(reg.get("http_requests_total")) == 0  # type: ignore[arg-type]


@pytest.mark.g1
def test_counts_are_durable_before_lifespan_shutdown_completes(reg: Registry) -> None:
    """uvicorn ends a worker right after ``lifespan.shutdown.complete`` on
    SIGTERM (no atexit): the middleware flushes before passing it on."""
    jobs = reg.counter("jobs_total")
    durable_then: list[int] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        jobs.inc(3)  # counted during shutdown, not yet flushed
        await send({"type": "lifespan.shutdown.complete"})

    async def receive() -> Message:
        return {"type": "lifespan.shutdown"}

    async def send(message: Message) -> None:
        durable_then.append(jobs.labels().durable_value)

    asyncio.run(KeepcountMiddleware(app, reg)({"type": "lifespan"}, receive, send))
    assert durable_then == [3]


# -- the example -----------------------------------------------------------------------


def load_example(path: Path, name: str, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)
    spec.loader.exec_module(module)
    return module


def test_fastapi_example(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"sqlite:///{tmp_path}/example.db"
    monkeypatch.setenv("KEEPCOUNT_STORE", url)
    monkeypatch.setenv("KEEPCOUNT_NODE", "node-1")
    example = load_example(EXAMPLE, "keepcount_example_fastapi", monkeypatch)
    try:
        [item, missing, counts] = get(example.app, "/items/1", "/items/99", "/counts")
        assert item.json() == {"id": 1, "name": "apple"}
        assert missing.status_code == 404
        assert {"method": "GET", "route": "/items/{item_id}", "status": "200", "value": 1} in (
            counts.json()["http_requests_total"]
        )
        assert stored(url, "http_requests_total") == {
            ("GET", "/items/{item_id}", "200"): 1,
            ("GET", "/items/{item_id}", "404"): 1,
            ("GET", "/counts", "200"): 1,
        }
        assert counts.json()["node"] == "node-1"
    finally:
        example.registry.close()
