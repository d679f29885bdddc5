"""The WSGI middleware on real SQLite files: labels, errors, durability, the bound, failures."""

from __future__ import annotations

import contextlib
import importlib.util
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from flask import Flask, abort
from werkzeug.test import Client, create_environ

from keepcount import Fenced, StoreUnavailable
from keepcount.metrics import decode_label_key
from keepcount.registry import Registry
from keepcount.stores import open_store
from keepcount.stores.base import FamilyDef, KeyRecord, SeriesRow
from keepcount.stores.sqlite import SQLiteStore
from keepcount.wsgi import KeepcountWSGIMiddleware

EXAMPLE = Path(__file__).parents[2] / "examples" / "flask_app.py"
ITEMS = ("GET", "/items/<int:item_id>", "200")

StartResponse = Callable[..., Callable[[bytes], object]]


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


def series(reg: Registry, name: str = "http_requests_total") -> dict[tuple[str, ...], Any]:
    family = reg.get(name)
    assert family is not None
    return dict(family.items())


def flask_app() -> Flask:
    app = Flask(__name__)

    @app.get("/items/<int:item_id>")
    def item(item_id: int) -> dict[str, int]:
        if item_id == 404:
            abort(404)
        return {"id": item_id}

    @app.get("/boom")
    def boom() -> str:
        raise RuntimeError("boom")

    @app.get("/unavailable")
    def unavailable() -> tuple[str, int]:
        return "down", 503

    return app


def wrap(app: Flask, reg: Registry, **options: Any) -> Flask:
    app.wsgi_app = KeepcountWSGIMiddleware(app.wsgi_app, reg, **options)  # type: ignore[method-assign]
    return app


def plain_app(
    status: str = "200 OK",
    body: Sequence[bytes] = (b"ok",),
    *,
    raise_before: bool = False,
    raise_in_body: int | None = None,
    closed: list[bool] | None = None,
) -> Any:
    """A bare WSGI app; ``raise_in_body=n`` raises after yielding ``n`` chunks."""

    class Body:
        def __iter__(self) -> Iterator[bytes]:
            for i, chunk in enumerate(body):
                if raise_in_body == i:
                    raise RuntimeError("in the body")
                yield chunk
            if raise_in_body == len(body):
                raise RuntimeError("in the body")

        def close(self) -> None:
            if closed is not None:
                closed.append(True)

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        if raise_before:
            raise RuntimeError("before the response")
        start_response(status, [("Content-Type", "text/plain")])
        return Body()

    return app


def run(app: Any, method: str = "GET", path: str = "/") -> tuple[str | None, list[bytes]]:
    """Run one request as a WSGI server would; returns the status the server got and the body."""
    got: list[str] = []

    def start_response(status: str, headers: Any, exc_info: Any = None) -> Callable[[bytes], None]:
        got.append(status)
        return lambda data: None

    out = app(create_environ(path, method=method), start_response)
    try:
        chunks = list(out)
    finally:
        out.close()
    return (got[-1] if got else None), chunks


# -- labels ------------------------------------------------------------------------


def test_two_item_ids_count_as_one_route_template(reg: Registry, db_url: str) -> None:
    c = wrap(flask_app(), reg).test_client()
    assert [c.get(p).status_code for p in ("/items/1", "/items/2")] == [200, 200]
    assert series(reg) == {ITEMS: 2}
    hist = reg.get("http_request_duration_seconds")
    assert hist is not None
    assert hist.labels("GET", "/items/<int:item_id>").value.count == 2
    assert stored(db_url, "http_requests_total") == {ITEMS: 2}  # durable, no extra commit


def test_status_labels_and_unmatched_routes(reg: Registry) -> None:
    c = wrap(flask_app(), reg).test_client()
    codes = [c.get(p).status_code for p in ("/items/404", "/no/such/path")]
    codes.append(c.post("/items/1").status_code)
    assert codes == [404, 404, 405]
    assert series(reg) == {
        ("GET", "/items/<int:item_id>", "404"): 1,
        ("GET", "<unmatched>", "404"): 1,
        ("POST", "<unmatched>", "405"): 1,
    }


def test_unknown_methods_are_other(reg: Registry) -> None:
    app = KeepcountWSGIMiddleware(plain_app(), reg)
    run(app, method="BREW")
    run(app, method="get")
    assert series(reg) == {("OTHER", "<unmatched>", "200"): 2}


def test_route_for_names_routes_of_other_frameworks(reg: Registry) -> None:
    def route_for(environ: dict[str, Any]) -> str | None:
        return "/known" if environ["PATH_INFO"] == "/a" else None

    app = KeepcountWSGIMiddleware(plain_app(), reg, route_for=route_for)
    run(app, path="/a")
    run(app, path="/b")
    assert series(reg) == {("GET", "/known", "200"): 1, ("GET", "<unmatched>", "200"): 1}


# -- errors ------------------------------------------------------------------------


def test_5xx_and_handled_exceptions_are_errors(reg: Registry, db_url: str) -> None:
    c = wrap(flask_app(), reg).test_client()
    assert c.get("/unavailable").status_code == 503
    assert c.get("/boom").status_code == 500  # Flask answers 500 itself (not testing mode)
    assert stored(db_url, "http_requests_total") == {
        ("GET", "/unavailable", "503"): 1,
        ("GET", "/boom", "500"): 1,
    }
    assert stored(db_url, "http_request_errors_total") == {
        ("GET", "/unavailable"): 1,
        ("GET", "/boom"): 1,
    }


def test_an_exception_from_the_app_counts_as_500_and_is_reraised(
    reg: Registry, db_url: str
) -> None:
    app = KeepcountWSGIMiddleware(plain_app(raise_before=True), reg)
    with pytest.raises(RuntimeError, match="before the response"):
        run(app)
    assert stored(db_url, "http_requests_total") == {("GET", "<unmatched>", "500"): 1}
    assert stored(db_url, "http_request_errors_total") == {("GET", "<unmatched>"): 1}


def test_an_exception_in_the_body_before_any_chunk_counts_as_500(reg: Registry) -> None:
    app = KeepcountWSGIMiddleware(plain_app(raise_in_body=0), reg)
    with pytest.raises(RuntimeError, match="in the body"):
        run(app)
    assert series(reg) == {("GET", "<unmatched>", "500"): 1}
    assert series(reg, "http_request_errors_total") == {("GET", "<unmatched>"): 1}


def test_an_exception_after_the_first_chunk_is_an_error_of_that_request(reg: Registry) -> None:
    app = KeepcountWSGIMiddleware(plain_app(body=[b"a", b"b"], raise_in_body=1), reg)
    with pytest.raises(RuntimeError, match="in the body"):
        run(app)
    assert series(reg) == {("GET", "<unmatched>", "200"): 1}
    assert series(reg, "http_request_errors_total") == {("GET", "<unmatched>"): 1}


# -- durability --------------------------------------------------------------------


@pytest.mark.g1
def test_durable_before_the_first_chunk_reaches_the_server(reg: Registry, db_url: str) -> None:
    app = KeepcountWSGIMiddleware(plain_app(body=[b"a", b"b"]), reg)
    got: list[str] = []

    def start_response(status: str, headers: Any, exc_info: Any = None) -> Callable[[bytes], None]:
        got.append(status)
        return lambda data: None

    body = app(create_environ("/"), start_response)
    it = iter(body)
    assert got == []  # the server has nothing to send yet: nothing is counted
    assert stored(db_url, "http_requests_total") == {}
    assert next(it) == b"a"
    assert got == ["200 OK"]
    assert stored(db_url, "http_requests_total") == {("GET", "<unmatched>", "200"): 1}
    assert list(it) == [b"b"]
    body.close()  # type: ignore[attr-defined]


def test_an_empty_body_is_counted_when_it_ends(reg: Registry, db_url: str) -> None:
    app = KeepcountWSGIMiddleware(plain_app("204 No Content", body=[]), reg)
    assert run(app) == ("204 No Content", [])
    assert stored(db_url, "http_requests_total") == {("GET", "<unmatched>", "204"): 1}


@pytest.mark.g1
def test_write_is_a_send_point(reg: Registry, db_url: str) -> None:
    seen: list[dict[tuple[str, ...], Any]] = []

    def legacy(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        write = start_response("200 OK", [("Content-Type", "text/plain")])
        write(b"written")
        return []

    def start_response(status: str, headers: Any, exc_info: Any = None) -> Callable[[bytes], None]:
        return lambda data: seen.append(stored(db_url, "http_requests_total"))

    body = KeepcountWSGIMiddleware(legacy, reg)(create_environ("/"), start_response)
    assert list(body) == []
    assert seen == [{("GET", "<unmatched>", "200"): 1}]


@pytest.mark.g1
def test_concurrent_threads_are_all_durable(reg: Registry, db_url: str) -> None:
    app = wrap(flask_app(), reg)

    def worker() -> None:
        c = app.test_client()
        for i in range(10):
            assert c.get(f"/items/{i}").status_code == 200

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert stored(db_url, "http_requests_total") == {ITEMS: 80}


def test_bounded_async_lets_at_most_max_pending_responses_start_undurable(
    reg: Registry, db_url: str
) -> None:
    mw = KeepcountWSGIMiddleware(plain_app(), reg, durable=False, max_pending=3)
    durable_after_each = []
    for i in range(8):
        run(mw)
        value = stored(db_url, "http_requests_total").get(("GET", "<unmatched>", "200"), 0)
        durable_after_each.append(value)
        assert (i + 1) - value <= 3
    assert durable_after_each == [0, 0, 0, 4, 4, 4, 4, 8]


# -- commit failures -----------------------------------------------------------------


@pytest.mark.g1
def test_a_failed_commit_replaces_the_response_with_503(freg: Registry) -> None:
    store: FailingStore = freg.store  # type: ignore[assignment]
    c = Client(wrap(flask_app(), freg))
    store.fail = StoreUnavailable("disk full")
    response = c.get("/items/1")
    assert response.status_code == 503
    assert response.content_type == "application/json"
    assert response.json is not None
    assert response.json["error"]["code"] == "store_unavailable"
    assert "disk full" in response.json["error"]["message"]
    assert stored(store.url, "http_requests_total") == {}
    store.fail = None
    freg.commit_sync()
    assert stored(store.url, "http_requests_total") == {ITEMS: 1}


def test_a_failed_commit_closes_the_apps_body(freg: Registry) -> None:
    freg.store.fail = Fenced("a newer incarnation took node-1")  # type: ignore[attr-defined]
    closed: list[bool] = []
    app = KeepcountWSGIMiddleware(plain_app(body=[b"secret"], closed=closed), freg)
    status, chunks = run(app)
    assert status == "503 Service Unavailable"
    assert b"secret" not in b"".join(chunks)
    assert b'"code": "fenced"' in b"".join(chunks)
    assert closed == [True]


@pytest.mark.g1
def test_a_failed_commit_at_write_sends_the_503_instead(freg: Registry) -> None:
    freg.store.fail = StoreUnavailable("store down")  # type: ignore[attr-defined]
    written: list[bytes] = []
    got: list[str] = []

    def legacy(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        write = start_response("200 OK", [])
        write(b"first")
        write(b"second")
        return [b"third"]

    def start_response(status: str, headers: Any, exc_info: Any = None) -> Callable[[bytes], None]:
        got.append(status)
        return written.append

    body = KeepcountWSGIMiddleware(legacy, freg)(create_environ("/"), start_response)
    assert list(body) == []
    assert got == ["503 Service Unavailable"]
    assert len(written) == 1
    assert b"store_unavailable" in written[0]


def test_bounded_async_failure_only_hits_the_response_that_waits(freg: Registry) -> None:
    app = KeepcountWSGIMiddleware(plain_app(), freg, durable=False, max_pending=1)
    freg.store.fail = StoreUnavailable("store down")  # type: ignore[attr-defined]
    assert [run(app)[0] for _ in range(2)] == ["200 OK", "503 Service Unavailable"]


def test_a_failed_commit_after_an_exception_is_noted_on_it(freg: Registry) -> None:
    freg.store.fail = StoreUnavailable("store down")  # type: ignore[attr-defined]
    app = KeepcountWSGIMiddleware(plain_app(raise_before=True), freg)
    with pytest.raises(RuntimeError) as info:
        run(app)
    assert any("not durable" in note for note in info.value.__notes__)


# -- the example -----------------------------------------------------------------------


def load_example(path: Path, name: str, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)
    spec.loader.exec_module(module)
    return module


def test_flask_example(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"sqlite:///{tmp_path}/example.db"
    monkeypatch.setenv("KEEPCOUNT_STORE", url)
    monkeypatch.setenv("KEEPCOUNT_NODE", "node-1")
    example = load_example(EXAMPLE, "keepcount_example_flask", monkeypatch)
    try:
        c = example.app.test_client()
        assert c.get("/items/1").json == {"id": 1, "name": "apple"}
        assert c.get("/items/99").status_code == 404
        counts = c.get("/counts").json
        assert counts["node"] == "node-1"
        assert {"method": "GET", "route": "/items/<int:item_id>", "status": "200", "value": 1} in (
            counts["http_requests_total"]
        )
        assert stored(url, "http_requests_total") == {
            ITEMS: 1,
            ("GET", "/items/<int:item_id>", "404"): 1,
            ("GET", "/counts", "200"): 1,
        }
    finally:
        example.registry.close()
