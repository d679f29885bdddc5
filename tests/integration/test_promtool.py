"""Prometheus' own linter, ``promtool check metrics``, on every /metrics keepcount serves.

promtool comes with Debian's ``prometheus`` package (``scripts/setup.sh``
installs it); without it these tests fail, they are not skipped.

promtool reads the Prometheus text format 0.0.4 only (OpenMetrics support is
prometheus/prometheus#8932, still open): given an OpenMetrics exposition it
takes each counter's ``<name>_total`` and ``<name>_created`` samples, and each
histogram's ``<name>_created``, for families of their own with no HELP line.
So the text format must be clean, and an OpenMetrics exposition must parse
(strictly, with prometheus_client's OpenMetrics parser, and with promtool)
and draw no complaint but those, each about a family that has a HELP line.
(Nor can promtool read OpenMetrics' ``\\"`` in a HELP text; see
``assert_clean_openmetrics``.)

The node runs in process, with its real lifespan, on a real SQLite file;
requests go through httpx's ASGI transport (as in ``test_node_api.py``).
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import parser as text_parser
from prometheus_client.metrics_core import Metric
from prometheus_client.openmetrics import parser as openmetrics_parser

import keepcount
from keepcount.exposition import missing_help, render
from keepcount.node import DEFAULT_HELP, MAX_HELP_LENGTH, Node, NodeConfig, create_app
from keepcount.stores import open_store

NODE = "node-1"
OPENMETRICS = "application/openmetrics-text; version=1.0.0"
INSTALL = "apt-get install prometheus"
parse_text: Callable[[str], Iterable[Metric]] = text_parser.text_string_to_metric_families
parse_openmetrics: Callable[[str], Iterable[Metric]] = (
    openmetrics_parser.text_string_to_metric_families
)


def promtool(body: bytes) -> tuple[int, list[str]]:
    """``promtool check metrics`` on ``body``: its exit status and its complaints."""
    path = shutil.which("promtool")
    if path is None:
        pytest.fail(
            f"promtool is missing: install Debian's prometheus package ({INSTALL}, "
            "or run scripts/setup.sh)",
            pytrace=False,
        )
    done = subprocess.run([path, "check", "metrics"], input=body, capture_output=True, timeout=60)
    out = (done.stdout + done.stderr).decode("utf-8", "replace")
    return done.returncode, sorted(line for line in out.splitlines() if line.strip())


def assert_clean_text(body: bytes) -> None:
    """A Prometheus text 0.0.4 exposition: not one complaint."""
    assert promtool(body) == (0, []), body.decode()
    families = list(parse_text(body.decode()))
    assert families and all(f.documentation for f in families)


def assert_clean_openmetrics(body: bytes) -> None:
    """An OpenMetrics exposition: valid OpenMetrics, and nothing for promtool to
    complain about but the samples it reads as families of their own.

    A HELP text with a double quote is written ``\\"`` in OpenMetrics, an
    escape the text format does not have: promtool cannot read such an
    exposition at all, so it is only parsed here (the text format carries the
    same families and is held to promtool)."""
    text = body.decode()
    assert text.endswith("# EOF\n")
    families = list(parse_openmetrics(text))  # strict
    assert families and all(f.documentation for f in families), "every family has a HELP"
    if any('"' in f.documentation for f in families):
        return
    misread = set()
    for f in families:
        suffixes = {"counter": ("_total", "_created"), "histogram": ("_created",)}.get(f.type, ())
        misread |= {s.name for s in f.samples if s.name.endswith(suffixes)}
    status, complaints = promtool(body)
    assert complaints == sorted(f"{name} no help text" for name in misread), text
    assert status == (3 if misread else 0), "3: lint problems, not 1: a parse error"


def help_lines(body: bytes) -> dict[str, str]:
    out = {}
    for line in body.decode().splitlines():
        if line.startswith("# HELP "):
            name, _, text = line.removeprefix("# HELP ").partition(" ")
            out[name] = text
    return out


def stored_help(url: str, name: str) -> str:
    store = open_store(url)
    try:
        return store.load(NODE).families[name].help
    finally:
        store.close()


def declare_without_help(url: str) -> None:
    """Families whose store kept no help text (as every family declared through
    HTTP before the increment API had ``help``): restored with help ""."""
    with keepcount.open(url, node=NODE, flush_interval=None) as reg:
        reg.counter("legacy_total", "", ["route"]).labels("/").inc(3)
        reg.histogram("legacy_seconds", "", [], buckets=[0.1, 1]).observe(0.5)
        reg.commit_sync()
    assert stored_help(url, "legacy_total") == ""


# -- the node --------------------------------------------------------------------------


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


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/counters.db"


@dataclass
class Running:
    client: httpx.AsyncClient
    node: Node

    @property
    def registry(self) -> keepcount.Registry:
        assert self.node.registry is not None
        return self.node.registry


@pytest.fixture
async def running(url: str) -> AsyncIterator[Running]:
    """A ready node on a store that holds families restored without a help text."""
    declare_without_help(url)
    app = create_app(NodeConfig(node=NODE, store=url))
    transport = httpx.ASGITransport(app=app)
    async with (
        Lifespan(app),
        httpx.AsyncClient(transport=transport, base_url="http://node") as client,
    ):
        deadline = time.monotonic() + 10
        while (await client.get("/readyz")).status_code != 200:
            assert time.monotonic() < deadline, "the node did not turn ready"
            await asyncio.sleep(0.005)
        yield Running(client, app.state.node)


async def increment(client: httpx.AsyncClient, name: str, **body: Any) -> httpx.Response:
    r = await client.post(f"/v1/counters/{name}/increment", json=body)
    assert r.status_code == 200, r.text
    return r


async def scrape(client: httpx.AsyncClient) -> tuple[bytes, bytes]:
    text = await client.get("/metrics")
    assert text.status_code == 200 and text.headers["content-type"].startswith("text/plain")
    om = await client.get("/metrics", headers={"accept": OPENMETRICS})
    assert om.status_code == 200
    assert om.headers["content-type"].startswith("application/openmetrics-text")
    return text.content, om.content


@pytest.mark.anyio
async def test_every_metrics_page_of_a_node_is_clean(running: Running, url: str) -> None:
    client = running.client
    await increment(client, "hits_total")  # no body: the default help
    await increment(client, "jobs", by=2)  # no _total: the formats add it
    await increment(client, "req_total", labels={"route": "/", "status": "200"},
                    help="Requests served, by route and status")  # fmt: skip
    await increment(client, "legacy_total", labels={"route": "/x"})  # restored, help ""
    reg = running.registry
    lat = reg.histogram("lat_seconds", "Request latency", ["route"], buckets=[0.01, 0.1, 1])
    lat.labels("/").observe(0.05)
    await reg.commit()

    text, om = await scrape(client)
    assert_clean_text(text)
    assert_clean_openmetrics(om)
    helps = help_lines(text)
    assert helps["hits_total"] == helps["jobs_total"] == DEFAULT_HELP
    assert helps["req_total"] == "Requests served, by route and status"
    assert helps["legacy_total"] == missing_help("counter")
    assert helps["legacy_seconds"] == missing_help("histogram")
    assert helps["lat_seconds"] == "Request latency"
    assert set(help_lines(om)) >= {"hits", "jobs", "req", "legacy", "legacy_seconds",
                                   "lat_seconds", "keepcount_node_info"}  # fmt: skip
    assert stored_help(url, "hits_total") == DEFAULT_HELP, "the default is stored with it"


@pytest.mark.anyio
async def test_a_later_help_replaces_the_family_s_and_none_keeps_it(
    running: Running, url: str
) -> None:
    client = running.client
    await increment(client, "hits_total")
    await increment(client, "hits_total", help="Hits, as the client calls them")
    await increment(client, "hits_total")  # no help: kept
    await increment(client, "hits_total", help="")  # empty: as none
    await increment(client, "legacy_total", labels={"route": "/"}, help="Now with a help")
    text, om = await scrape(client)
    assert help_lines(text)["hits_total"] == "Hits, as the client calls them"
    assert help_lines(text)["legacy_total"] == "Now with a help"
    assert_clean_text(text)
    assert_clean_openmetrics(om)
    await running.registry.commit()  # a new help is stored by the next flush
    assert stored_help(url, "hits_total") == "Hits, as the client calls them"
    assert stored_help(url, "legacy_total") == "Now with a help"


@pytest.mark.anyio
async def test_the_longest_help_and_any_printable_text_are_accepted(running: Running) -> None:
    longest = "é" * MAX_HELP_LENGTH
    await increment(running.client, "long_total", help=longest)
    tricky = 'Zähler with "quotes", a \\ backslash and an emoji 🙂'
    await increment(running.client, "tricky_total", help=tricky)
    text, om = await scrape(running.client)
    assert_clean_text(text)
    assert_clean_openmetrics(om)
    families = {f.name: f for f in parse_text(text.decode())}
    assert families["long"].documentation == longest
    assert families["tricky"].documentation == tricky


async def state(client: httpx.AsyncClient) -> tuple[Any, list[str]]:
    """What a refused request must leave as it was: the values, and /metrics
    but for the node gauges (facts about the process, such as its flushes)."""
    listed = (await client.get("/v1/counters")).json()
    text = (await client.get("/metrics")).text
    return listed, [line for line in text.splitlines() if "keepcount_" not in line]


@pytest.mark.g6
@pytest.mark.anyio
@pytest.mark.parametrize(
    "body",
    [
        b'{"help": 5}',
        b'{"help": null}',
        b'{"help": true}',
        b'{"help": ["a"]}',
        b'{"help": {"text": "a"}}',
        b'{"help": "' + b"x" * (MAX_HELP_LENGTH + 1) + b'"}',
        b'{"help": "' + b"x" * 5000 + b'"}',
        b'{"help": "two\\nlines"}',
        b'{"help": "a\\ttab"}',
        b'{"help": "a\\u0000nul"}',
        b'{"help": "a\\u007fdel"}',
        b'{"help": "a\\u0085next line"}',
        b'{"help": "\\ud800"}',
    ],
)
async def test_a_bad_help_is_422_and_changes_nothing(
    running: Running, url: str, body: bytes
) -> None:
    client, reg = running.client, running.registry
    await increment(client, "hits_total", labels={"a": "x"}, help="Hits")
    before = await state(client)
    for name in ("hits_total", "fresh_total"):  # an existing family, and a new one
        r = await client.post(f"/v1/counters/{name}/increment", content=body,
                              headers={"content-type": "application/json"})  # fmt: skip
        assert r.status_code == 422, r.text
        assert r.headers["content-type"] == "application/json"
        assert set(r.json()) == {"error"} and set(r.json()["error"]) == {"code", "message"}
        assert r.json()["error"]["code"] == "invalid_input"
        assert "help" in r.json()["error"]["message"]
        assert await state(client) == before
    assert reg.get("fresh_total") is None, "a refused request declares nothing"
    hits = reg.get("hits_total")
    assert hits is not None and hits.help == "Hits"
    await reg.commit()
    assert stored_help(url, "hits_total") == "Hits"
    store = open_store(url)
    try:
        assert "fresh_total" not in store.load(NODE).families
    finally:
        store.close()


@pytest.mark.g6
@pytest.mark.anyio
async def test_a_refused_increment_does_not_change_the_help(running: Running) -> None:
    client = running.client
    r = await client.post("/v1/counters/hits_total/increment", json={"help": "First"},
                          headers={"idempotency-key": "k-1"})  # fmt: skip
    assert r.status_code == 200
    r = await client.post("/v1/counters/hits_total/increment", json={"by": 2, "help": "Second"},
                          headers={"idempotency-key": "k-1"})  # fmt: skip
    assert r.status_code == 422 and r.json()["error"]["code"] == "idempotency_key_reused"
    text, _ = await scrape(client)
    assert help_lines(text)["hits_total"] == "First"


# -- exposition.render() ---------------------------------------------------------------


@pytest.mark.parametrize("node_metrics", [True, False])
def test_render_is_clean_for_every_kind_of_family(db_url: str, node_metrics: bool) -> None:
    declare_without_help(db_url)
    with keepcount.open(db_url, node=NODE, flush_interval=None) as reg:
        hits = reg.counter("http_requests_total", "Requests", ["route", "status"])
        hits.labels("/", "200").inc(41)
        hits.labels("/", 500).inc()
        reg.counter("jobs", "Jobs run").inc(7)
        reg.counter("bare_total").inc()  # declared without help
        lat = reg.histogram("latency_seconds", "Latency", ["route"], buckets=[0.005, 0.1, 1])
        for v in (0.001, 0.05, 3):
            lat.labels("/").observe(v)
        reg.histogram("sizes_bytes", "", buckets=[10, 100]).observe(50)
        reg.commit_sync()
        legacy = reg.get("legacy_total")
        assert legacy is not None and legacy.help == "", "restored without a help text"
        text, _ = render(reg, None, node_metrics=node_metrics)
        om, _ = render(reg, OPENMETRICS, node_metrics=node_metrics)
    assert_clean_text(text)
    assert_clean_openmetrics(om)
    helps = help_lines(text)
    assert helps["legacy_total"] == helps["bare_total"] == missing_help("counter")
    assert helps["legacy_seconds"] == helps["sizes_bytes"] == missing_help("histogram")
    assert ("keepcount_node_info" in helps) is node_metrics


def test_a_missing_promtool_fails_naming_the_install_command(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(pytest.fail.Exception, match=INSTALL):
        promtool(b"")
