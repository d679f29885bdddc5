"""The live page's pieces without a browser: ``state.json`` from both sources,
the state changes it carries, the files and their headers, and the page's
rule that data never reaches the DOM as HTML."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import jsonschema_rs
import pytest
from starlette.applications import Starlette

import keepcount
from keepcount.cluster.api import ClusterView, create_api
from keepcount.node import NodeConfig, create_app
from keepcount.stores.base import NodeRecord
from keepcount.totals import SeriesTotal
from keepcount.ui import (
    ASSETS,
    MAX_SERIES,
    NODE_STATES,
    STATE_PATH,
    STATE_SCHEMA,
    TimedCache,
    Transitions,
    asset_routes,
    cluster_state,
    node_state,
    series_counters,
)
from keepcount.ui import state as ui_state

UI_DIR = Path(keepcount.__file__).parent / "ui"
VALIDATOR = jsonschema_rs.Draft202012Validator(STATE_SCHEMA)
IMG = "<img src=x onerror=window.pwned=1>"


def valid(doc: dict[str, Any]) -> dict[str, Any]:
    """``doc`` after a JSON round trip, checked against the schema."""
    doc = json.loads(json.dumps(doc))
    VALIDATOR.validate(doc)
    return doc


# -- Transitions and TimedCache ----------------------------------------------------


def test_transitions_record_changes_only_in_time_order() -> None:
    tr = Transitions(keep=100)
    assert tr.observe("n1", "starting", 10.0)
    assert not tr.observe("n1", "starting", 11.0), "no change"
    assert tr.observe("n1", "ready", 12.0)
    assert not tr.observe("n1", "down", 11.5), "older than the last one: ignored"
    assert tr.observe("n1", "down", 13.0)
    assert tr.history("n1", now=14.0) == [
        {"t": 10.0, "state": "starting"},
        {"t": 12.0, "state": "ready"},
        {"t": 13.0, "state": "down"},
    ]
    assert tr.current("n1") == (13.0, "down")
    assert tr.current("n2") is None and tr.history("n2") == []


def test_old_transitions_are_dropped_but_the_current_state_is_kept() -> None:
    tr = Transitions(keep=10)
    tr.observe("n1", "restoring", 0.0)
    tr.observe("n1", "ready", 1.0)
    assert tr.history("n1", now=100.0) == [{"t": 1.0, "state": "ready"}]


def test_the_cache_reads_once_per_ttl_and_one_read_at_a_time() -> None:
    reads = 0

    async def load() -> int:
        nonlocal reads
        reads += 1
        await asyncio.sleep(0.01)  # a read that takes a while
        return reads

    async def main() -> None:
        cache = TimedCache(60)
        assert await asyncio.gather(*(cache.get(load) for _ in range(5))) == [1] * 5
        assert await cache.get(load) == 1 and reads == 1
        cache.ttl = 0
        assert await cache.get(load) == 2

    asyncio.run(main())


# -- the document ------------------------------------------------------------------


def _status() -> dict[str, Any]:
    return {
        "nodes": [
            {"id": "node-1", "state": "ready", "restarts": 0, "incarnations": 1, "stale": [],
             "pid": 11, "slot": "node-1.a", "url": "http://x", "epoch": 4, "incarnation": 1,
             "uptime": 12.5, "ready": True},
            {"id": "node-2", "state": "down", "restarts": 1, "incarnations": 1,
             "stale": [{"pid": 9, "slot": "node-2.b", "state": "paused"}]},
        ],
        "lb": {"kind": "haproxy", "url": "http://127.0.0.1:8100",
               "backends": {"node-1.a": "UP", "node-2.a": "DOWN"}},
    }  # fmt: skip


def test_the_cluster_document_follows_the_schema() -> None:
    tr = Transitions()
    tr.observe("node-2", "down", 5.0)
    counters = {
        "counters": [
            {"name": "a_total", "kind": "counter", "labels": {"shop": IMG}, "value": 5,
             "nodes": {"node-2": 3, "node-1": 2}},
            {"name": "lat", "kind": "histogram", "labels": {},
             "value": {"count": 1, "sum": 0.5, "buckets": {"+Inf": 1}},
             "nodes": {"node-1": {"count": 1, "sum": 0.5, "buckets": {"+Inf": 1}}}},
        ]
    }  # fmt: skip
    events = [{"t": 1.0, "mono": 9.0, "event": "started", "node": "node-1", "seq": i}
              for i in range(100)]  # fmt: skip
    doc = valid(cluster_state(_status(), counters, events, tr, now=6.0, counters_time=5.5))
    assert doc["source"] == "cluster" and doc["self"] is None and doc["time"] == 6.0
    one, two = doc["nodes"]
    assert one["state"] == "ready" and one["epoch"] == 4 and one["slot"] == "node-1.a"
    assert two["state"] == "down" and two["pid"] is None and two["since"] == 5.0
    assert "pid 9 (paused)" in two["detail"]
    assert two["history"] == [{"t": 5.0, "state": "down"}]
    assert doc["lb"]["backends"] == {"node-1.a": "UP", "node-2.a": "DOWN"}
    assert doc["counters"] == [
        {"name": "a_total", "help": "", "labels": {"shop": IMG}, "value": 5,
         "nodes": {"node-1": 2, "node-2": 3}}
    ], "counters only (histograms are for /metrics), the label value untouched"  # fmt: skip
    assert doc["counters_time"] == 5.5 and doc["counters_error"] is None
    assert len(doc["events"]) == ui_state.MAX_EVENTS and "mono" not in doc["events"][0]


def test_a_slot_no_incarnation_holds_is_on_standby_not_down() -> None:
    status = _status()
    status["lb"]["backends"].update({"node-1.b": "DOWN", "node-2.b": "DOWN"})
    doc = valid(cluster_state(status, None, [], Transitions()))
    # node-1 holds node-1.a, node-2's old incarnation (alive) holds node-2.b
    assert doc["lb"]["standby"] == ["node-1.b", "node-2.a"]
    assert doc["lb"]["backends"]["node-2.b"] == "DOWN", "the balancer's view, unchanged"


def test_without_a_ready_node_the_cluster_document_says_why() -> None:
    doc = valid(cluster_state(_status(), None, [], Transitions(), counters_time=1.0))
    assert doc["counters"] == [] and doc["counters_time"] is None
    assert "no node is ready" in doc["counters_error"]


def test_the_node_document_follows_the_schema() -> None:
    tr = Transitions()
    tr.observe("node-1", "restoring", 1.0)
    tr.observe("node-1", "ready", 2.0)
    records = [
        NodeRecord("node-2", 3, claimed_at=5.0, released_at=None),
        NodeRecord("node-1", 7, claimed_at=1.5, released_at=None),
        NodeRecord("node-0", 1, claimed_at=1.0, released_at=2.0),
    ]
    totals = [SeriesTotal("b_total", "counter", {"k": IMG}, 4, {"node-1": 4})]
    counters, left = series_counters(totals, {"b_total": f"help {IMG}"})
    doc = valid(node_state(
        "node-1", "ready", detail=None, epoch=7, uptime=3.0, pid=42, transitions=tr,
        records=records, counters=counters, truncated=left, counters_time=2.5, now=3.0,
    ))  # fmt: skip
    assert doc["source"] == "node" and doc["self"] == "node-1" and doc["lb"] is None
    assert [(n["id"], n["state"]) for n in doc["nodes"]] == [
        ("node-1", "ready"), ("node-0", "released"), ("node-2", "claimed"),
    ]  # fmt: skip
    me = doc["nodes"][0]
    assert me["epoch"] == 7 and me["pid"] == 42 and me["since"] == 2.0 and me["restarts"] is None
    assert doc["nodes"][1]["since"] == 2.0 and doc["nodes"][2]["epoch"] == 3
    assert doc["counters"] == [
        {"name": "b_total", "help": f"help {IMG}", "labels": {"k": IMG}, "value": 4,
         "nodes": {"node-1": 4}}
    ]  # fmt: skip
    restoring = valid(node_state("node-1", "restoring", detail="claiming", epoch=None,
                                 uptime=0.1, pid=42, transitions=Transitions()))  # fmt: skip
    assert restoring["counters"] == [] and "not ready" in restoring["counters_error"]


def test_at_most_max_series_are_sent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ui_state, "MAX_SERIES", 2)
    totals = [SeriesTotal("c_total", "counter", {"i": str(i)}, i) for i in range(5)]
    counters, left = series_counters(totals, {})
    assert len(counters) == 2 and left == 3
    assert MAX_SERIES > 100


# -- the cluster's view ------------------------------------------------------------


@dataclass
class FakeIncarnation:
    now: str

    def state(self) -> str:
        return self.now


@dataclass
class FakeNodeState:
    current: FakeIncarnation | None


@dataclass
class FakeSupervisor:
    """What ``ClusterView`` reads of a ``Supervisor``."""

    nodes: dict[str, FakeNodeState]
    events: deque[dict[str, Any]] = field(default_factory=deque)
    event_count: int = 0
    answer: dict[str, Any] | None = None

    def event(self, what: str, node: str | None = None) -> None:
        self.event_count += 1
        self.events.append({"t": time.time(), "mono": 0.0, "event": what, "node": node,
                            "seq": self.event_count})  # fmt: skip

    def status(self) -> dict[str, Any]:
        return {
            "nodes": [
                {"id": k, "state": v.current.state() if v.current else "down", "restarts": 0}
                for k, v in self.nodes.items()
            ],
            "lb": {"kind": "haproxy", "url": "http://lb", "backends": {}},
        }

    async def counters(self) -> dict[str, Any] | None:
        return self.answer


def test_a_kill_shorter_than_a_sample_still_shows_down() -> None:
    """The detector restarts a killed node within one tick: only its events
    tell that it was down."""
    sup = FakeSupervisor({"node-1": FakeNodeState(FakeIncarnation("ready"))})
    view = ClusterView(sup)  # type: ignore[arg-type]
    view.sample()
    sup.event("exited", "node-1")
    sup.event("started", "node-1")
    sup.event("evicted", "node-1")
    sup.event("cluster_ready")
    sup.nodes["node-1"].current = FakeIncarnation("restoring")
    view.sample()
    sup.nodes["node-1"].current = FakeIncarnation("ready")
    view.sample()
    states = [h["state"] for h in view.transitions.history("node-1")]
    assert states == ["ready", "down", "starting", "restoring", "ready"]


def test_the_cluster_api_serves_the_page_and_its_document() -> None:
    sup = FakeSupervisor({"node-1": FakeNodeState(None)})
    sup.answer = {"counters": [{"name": "x_total", "kind": "counter", "labels": {},
                                "value": 1, "nodes": {"node-1": 1}}]}  # fmt: skip
    app = create_api(sup)  # type: ignore[arg-type]

    async def main() -> None:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
            r = await client.get(STATE_PATH)
            assert r.status_code == 200 and r.headers["cache-control"] == "no-store"
            doc = valid(r.json())
            assert doc["source"] == "cluster" and doc["nodes"][0]["state"] == "down"
            assert doc["counters"][0]["name"] == "x_total"
            page = await client.get("/ui")
            assert page.status_code == 200 and "text/html" in page.headers["content-type"]

    asyncio.run(main())


# -- a node's page -----------------------------------------------------------------


def test_a_node_serves_its_document_while_restoring_and_once_ready(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/c.db"
    with keepcount.open(url, node="old-1") as reg:
        reg.counter("seen_total", f"help {IMG}", labelnames=["k"]).labels(IMG).inc(2)
        reg.commit_sync()
    app = create_app(NodeConfig(node="node-1", store=url))
    asyncio.run(_node_page(app))


async def _node_page(app: Starlette) -> None:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://node") as client:
        doc = valid((await client.get(STATE_PATH)).json())
        assert doc["nodes"][0]["state"] == "restoring", "no lifespan yet: never opened"
        assert doc["counters"] == [] and doc["counters_error"]
        async with app.router.lifespan_context(app):
            deadline = time.monotonic() + 20
            while app.state.node.ready() is None:
                assert time.monotonic() < deadline, "the node did not turn ready"
                await asyncio.sleep(0.01)
            doc = valid((await client.get(STATE_PATH)).json())
        me, old = doc["nodes"]
        assert (me["id"], me["state"], old["id"], old["state"]) == (
            "node-1", "ready", "old-1", "released",
        )  # fmt: skip
        assert [h["state"] for h in me["history"]] == ["restoring", "ready"]
        assert doc["counters"] == [{"name": "seen_total", "help": f"help {IMG}",
                                    "labels": {"k": IMG}, "value": 2,
                                    "nodes": {"old-1": 2}}]  # fmt: skip


# -- the files ---------------------------------------------------------------------


def test_every_file_of_the_page_is_served_with_its_type_and_the_csp() -> None:
    app = Starlette(routes=asset_routes())

    async def main() -> None:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://x") as client:
            for path, (name, content_type) in ASSETS.items():
                r = await client.get(path)
                assert r.status_code == 200, path
                assert r.headers["content-type"] == content_type
                assert "script-src 'self'" in r.headers["content-security-policy"]
                assert r.headers["x-content-type-options"] == "nosniff"
                assert r.content == (UI_DIR / name).read_bytes()

    asyncio.run(main())


def test_the_page_loads_only_served_files_by_relative_urls() -> None:
    html = (UI_DIR / "index.html").read_text()
    refs = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert refs and all(r == "data:," or "/ui/" + r.removeprefix("ui/") in ASSETS for r in refs)
    assert not any(r.startswith(("/", "http:", "https:", "//")) for r in refs), "no CDN"
    assert "'ui/state.json'" in (UI_DIR / "ui.js").read_text()


def test_the_page_never_builds_html_from_data() -> None:
    js = (UI_DIR / "ui.js").read_text()
    code = re.sub(r"/\*.*?\*/|//[^\n]*", "", js, flags=re.S)  # comments may name them
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(",
                 "new Function", "setAttribute("):  # fmt: skip
        assert sink not in code, sink


def test_the_page_knows_every_state() -> None:
    js = (UI_DIR / "ui.js").read_text()
    known = re.search(r"KNOWN_STATES = new Set\(\[(.*?)\]\)", js, re.S)
    assert known is not None
    assert set(NODE_STATES) <= set(re.findall(r"'([a-z]+)'", known.group(1)))


def test_the_vendored_files_match_their_record() -> None:
    import hashlib

    record = (UI_DIR / "vendor" / "VENDOR.md").read_text()
    for name in ("uPlot.iife.min.js", "uPlot.min.css"):
        digest = hashlib.sha256((UI_DIR / "vendor" / name).read_bytes()).hexdigest()
        assert f"`{name}` | npm `uplot`" in record and digest in record, name
    assert "MIT License" in (UI_DIR / "vendor" / "uPlot.LICENSE").read_text()
