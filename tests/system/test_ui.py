"""The live page (``/ui``) in a real browser, against a real local cluster.

Debian's Chromium (``/usr/bin/chromium``), driven by playwright-core from
``tests/browser`` (``tests/browser/driver.mjs``: one JSON command a line on
its stdin; no browser is ever downloaded).  One cluster for the module: 3
``keepcount node`` processes behind HAProxy, claims in etcd, the SQLite
store, its supervisor (with its control API, which serves the cluster's
page) in an event loop of its own thread.

- A node is SIGKILLed while a few keyed increments a second go through the
  load balancer: the page shows every node ready, then the victim down,
  restoring and ready again, and its chart's lines never go down.  A
  screenshot is kept in ``test-artifacts/ui.png``.
- Counter label values and help texts that carry HTML are shown as text,
  on the cluster's page and on a node's: nothing of it runs.

Without Chromium or the driver's node_modules the tests fail (never skip)
with the command that installs them.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import shutil
import signal
import threading
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import pytest

import keepcount
from keepcount.cluster.spec import ClusterSpec
from keepcount.cluster.supervisor import Supervisor
from keepcount.cluster.workload import labels_key

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

T = TypeVar("T")

ROOT = Path(__file__).resolve().parents[2]
BROWSER_DIR = ROOT / "tests" / "browser"
DRIVER = BROWSER_DIR / "driver.mjs"
CHROMIUM = Path(os.environ.get("CHROMIUM", "/usr/bin/chromium"))
ARTIFACTS = ROOT / "test-artifacts"
INSTALL = "apt-get install -y chromium chromium-driver nodejs npm && npm ci --prefix tests/browser"

NAME = "ui_orders_total"
LABELS = [{"shop": "a"}, {"shop": "b"}]
LOAD_EVERY = 0.2  # seconds between two increments: a few a second is enough for the charts
IMG = "<img src=x onerror=window.pwned=1>"
BOLD = "<b>x</b>"


# -- the browser ---------------------------------------------------------------


def require_browser() -> None:
    """Fail (never skip) with the install command if the browser cannot run."""
    missing = []
    if not CHROMIUM.exists():
        missing.append(f"no Chromium at {CHROMIUM}")
    if shutil.which("node") is None:
        missing.append("no `node` on PATH")
    if not (BROWSER_DIR / "node_modules" / "playwright-core" / "package.json").exists():
        missing.append(f"no playwright-core in {BROWSER_DIR / 'node_modules'}")
    if missing:
        pytest.fail(
            f"{'; '.join(missing)}. Install them (as root, from the repository root): {INSTALL}",
            pytrace=False,
        )


class BrowserError(AssertionError):
    """A command failed in the browser (a wait timed out, a script threw)."""


class Browser:
    """Headless Chromium through ``tests/browser/driver.mjs``.

    Example::

        async with Browser.open() as b:
            await b.call("goto", url="http://127.0.0.1:8000/ui")
            rows = await b.wait("document.querySelectorAll('tr').length > 2", 30)
    """

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.stderr = bytearray()
        self._id = 0

    @classmethod
    @contextlib.asynccontextmanager
    async def open(cls) -> AsyncIterator[Browser]:
        require_browser()
        proc = await asyncio.create_subprocess_exec(
            "node", str(DRIVER),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, cwd=BROWSER_DIR,
            env={**os.environ, "CHROMIUM": str(CHROMIUM)},
            start_new_session=True,  # its own process group: Chromium's processes go with it
            limit=1 << 24,  # a screenshot path is short, but a page's text may not be
        )  # fmt: skip
        browser = cls(proc)
        drain = asyncio.create_task(browser._drain_stderr())
        try:
            assert proc.stdout is not None
            first = await asyncio.wait_for(proc.stdout.readline(), 90)
            if not first:
                await asyncio.wait_for(proc.wait(), 10)
                raise BrowserError(f"the browser did not start: {browser.stderr.decode()}")
            print(f"browser: {json.loads(first)}")
            yield browser
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(browser.call("close"), 20)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)  # whatever of the group is left
            await proc.wait()
            drain.cancel()
            await asyncio.gather(drain, return_exceptions=True)

    async def _drain_stderr(self) -> None:
        assert self.proc.stderr is not None
        while chunk := await self.proc.stderr.read(65536):
            self.stderr += chunk[-65536:]

    async def call(self, op: str, timeout: float = 60, **args: Any) -> Any:
        """Run one command; its result (raises ``BrowserError`` if it failed)."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self._id += 1
        self.proc.stdin.write(json.dumps({"id": self._id, "op": op, **args}).encode() + b"\n")
        await self.proc.stdin.drain()
        while True:
            line = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
            if not line:
                raise BrowserError(f"the browser driver exited: {self.stderr.decode()[-3000:]}")
            answer = json.loads(line)
            if answer.get("id") == self._id:
                break
        if not answer["ok"]:
            raise BrowserError(f"{op} failed: {answer['error']}")
        return answer["result"]

    async def wait(self, expression: str, timeout: float, what: str = "") -> Any:
        """Until ``expression`` (JS, in the page) is truthy; its value."""
        try:
            return await self.call(
                "wait", timeout=timeout + 30, expression=expression, timeout_ms=int(timeout * 1000)
            )
        except BrowserError as exc:
            state = await self.call("eval", expression="JSON.stringify(window.keepcountState)")
            raise BrowserError(f"{what or expression}: {exc}\nlast state.json: {state}") from None

    async def eval(self, expression: str) -> Any:
        return await self.call("eval", expression=expression)

    async def errors(self) -> list[dict[str, Any]]:
        """Script errors and console errors so far."""
        log: list[dict[str, Any]] = await self.call("log")
        return [e for e in log if e["kind"] == "pageerror" or e.get("type") == "error"]

    async def screenshot(self, name: str) -> Path:
        ARTIFACTS.mkdir(exist_ok=True)
        path = ARTIFACTS / name
        await self.call("screenshot", path=str(path))
        print(f"screenshot: {path}")
        return path


# -- the cluster ---------------------------------------------------------------


@dataclass
class LiveCluster:
    """A supervised cluster running in an event loop of its own thread."""

    sup: Supervisor
    loop: asyncio.AbstractEventLoop

    @property
    def spec(self) -> ClusterSpec:
        return self.sup.spec

    async def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Await ``coro`` in the cluster's loop, from another loop."""
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self.loop))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveCluster]:
    spec = ClusterSpec.allocate(tmp_path_factory.mktemp("ui") / "cluster", nodes=3)
    spec.save()
    started = threading.Event()

    def on_event(ev: dict[str, Any]) -> None:
        if ev["event"] in ("cluster_ready", "cluster_down"):
            started.set()

    sup = Supervisor(spec, api=True, on_event=on_event)
    loop = asyncio.new_event_loop()
    failure: list[BaseException] = []

    def supervise() -> None:
        try:
            loop.run_until_complete(sup.run())
        except BaseException as exc:
            failure.append(exc)
        finally:
            started.set()

    thread = threading.Thread(target=supervise, name="keepcount-ui-cluster", daemon=True)
    thread.start()
    try:
        assert started.wait(180), "the cluster did not start in 180 s"
        assert not failure and sup.ready.is_set(), f"the cluster did not start: {failure}"
        yield LiveCluster(sup, loop)
    finally:
        sup.stop()
        thread.join(120)
        assert not thread.is_alive(), "the supervisor did not stop"
        loop.close()
        for path in sorted((spec.directory / "nodes").glob("*.log")):  # shown when a test fails
            print(f"--- {path.name}\n{path.read_text(errors='replace')[-1500:]}")


@dataclass
class PacedLoad:
    """Keyed increments through the load balancer, one every ``LOAD_EVERY``
    seconds, each retried with its key until acknowledged; ``tally`` holds
    the acknowledged ones per label set."""

    url: str
    tally: Counter[str]
    errors: int = 0

    async def run(self, session: aiohttp.ClientSession, stop: asyncio.Event) -> None:
        path = f"{self.url}/v1/counters/{NAME}/increment"
        timeout = aiohttp.ClientTimeout(total=5)
        i = 0
        while not stop.is_set():
            labels = LABELS[i % len(LABELS)]
            headers = {"Idempotency-Key": f"ui-{uuid.uuid4().hex}"}
            deadline = time.monotonic() + 60
            while True:
                assert time.monotonic() < deadline, f"an increment of {labels} was never acked"
                with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                    body = {"labels": labels, "by": 1}
                    async with session.post(path, json=body, headers=headers, timeout=timeout) as r:
                        await r.read()
                        if r.status == 200:
                            break
                self.errors += 1
                await asyncio.sleep(0.05)  # retry backoff
            self.tally[labels_key(labels)] += 1
            i += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), LOAD_EVERY)  # the pace


@contextlib.asynccontextmanager
async def paced_load(url: str) -> AsyncIterator[PacedLoad]:
    load = PacedLoad(url, Counter())
    stop = asyncio.Event()
    async with aiohttp.ClientSession() as session:
        task = asyncio.create_task(load.run(session, stop))
        try:
            yield load
        finally:
            stop.set()
            await asyncio.wait_for(task, 90)
        async with session.get(f"{url}/v1/cluster/counters/{NAME}") as r:
            body = await r.json()
            assert r.status == 200, body
    totals = {labels_key(c["labels"]): c["value"] for c in body["counters"]}
    assert totals == dict(load.tally), "cluster totals == acknowledged increments"


# -- page expressions ----------------------------------------------------------


def rows_js() -> str:
    """The nodes table: [[node, state], ...] as the page shows it."""
    return (
        "[...document.querySelectorAll('#nodes tbody tr')]"
        ".map(r => [r.dataset.node, r.querySelector('.state').textContent])"
    )


def all_ready_js(nodes: list[str]) -> str:
    return (
        f"(() => {{ const rows = {rows_js()}; const want = {json.dumps(sorted(nodes))};"
        " return rows.length === want.length"
        " && JSON.stringify(rows.map(r => r[0]).sort()) === JSON.stringify(want)"
        " && rows.every(r => r[1] === 'ready') ? rows : null; })()"
    )


def came_back_js(node: str, since: float) -> str:
    """The node's state changes after ``since`` once they hold down, then
    restoring, then ready (in that order); null before."""
    return (
        "(() => { const seq = window.keepcountTransitions"
        f".filter(x => x.node === {json.dumps(node)} && x.t >= {since})"
        ".map(x => x.state);"
        " const i = seq.indexOf('down'); const j = i < 0 ? -1 : seq.indexOf('restoring', i + 1);"
        " const k = j < 0 ? -1 : seq.indexOf('ready', j + 1);"
        " return k < 0 ? null : seq; })()"
    )


def logged_js(node: str) -> str:
    """The states the page's "State changes" list shows for ``node``, oldest first."""
    return (
        f"[...document.querySelectorAll('#transitions li[data-node={json.dumps(node)}]')]"
        ".map(li => li.querySelector('.state').textContent).reverse()"
    )


def points_js(name: str) -> str:
    return f"(window.keepcountSeries[{json.dumps(name)}] || {{t: []}}).t.length"


def never_decreases(values: list[int | None]) -> bool:
    seen = [v for v in values if v is not None]
    return all(a <= b for a, b in itertools.pairwise(seen))


# -- the tests -----------------------------------------------------------------


def test_the_page_follows_a_killed_node_down_restoring_and_ready_again(
    cluster: LiveCluster,
) -> None:
    require_browser()
    asyncio.run(_kill_and_watch(cluster))


async def _kill_and_watch(cluster: LiveCluster) -> None:
    sup, spec = cluster.sup, cluster.spec
    nodes = [n.id for n in spec.nodes]
    victim = nodes[1]
    async with paced_load(spec.lb_url) as load, Browser.open() as browser:
        await browser.call("goto", url=f"{spec.api_url}/ui")
        rows = await browser.wait(all_ready_js(nodes), 90, "the page shows every node ready")
        print(f"page: {rows}")
        await browser.wait(f"{points_js(NAME)} >= 3", 90, f"the chart of {NAME} has points")
        assert await browser.eval("document.querySelectorAll('#lb tbody tr').length") == 6, (
            "the load balancer's two slots of each node"
        )

        before = sup.nodes[victim].incarnations
        killed_at = time.time()
        await cluster.run(sup.signal(victim, "KILL"))
        seq = await browser.wait(
            came_back_js(victim, killed_at), 120, f"{victim}: down, restoring, ready on the page"
        )
        print(f"{victim} after the kill, as the page saw it: {seq}")
        await browser.wait(all_ready_js(nodes), 90, "every node ready again")
        ns = sup.nodes[victim]
        assert ns.incarnations > before and ns.restarts >= 1
        row = await browser.eval(
            f"(() => {{ const r = document.querySelector('#nodes tr[data-node={json.dumps(victim)}]');"
            " return [...r.cells].map(c => c.textContent); })()"
        )
        assert row[0] == victim and row[1] == "ready" and int(row[5]) >= 1, row  # restarts
        shown = await browser.eval(logged_js(victim))
        assert shown[-1] == "ready" and "down" in shown and "restoring" in shown, shown

        # A few more points after the restart, then the whole line: never down.
        now = await browser.eval(points_js(NAME))
        await browser.wait(f"{points_js(NAME)} >= {now + 3}", 60, "points after the restart")
        series = await browser.eval(f"window.keepcountSeries[{json.dumps(NAME)}]")
        assert series["t"] == sorted(set(series["t"])), "one point per read, in time order"
        assert series["t"][0] < killed_at < series["t"][-1], "the chart spans the kill"
        assert never_decreases(series["total"]), series["total"]
        for node, values in series["nodes"].items():
            assert never_decreases(values), (node, values)
        assert victim in series["nodes"], "the victim's own line"
        assert await browser.eval("document.querySelector('#counters canvas') !== null")
        await browser.screenshot("ui.png")
        assert await browser.errors() == []
    assert sum(load.tally.values()) > 0


def test_names_label_values_and_help_texts_are_shown_as_text(cluster: LiveCluster) -> None:
    require_browser()
    # A counter whose help text and label values are HTML, written by a
    # released node id of the same store (the cluster's totals include it),
    # and another through the load balancer, from a live node.
    reg = keepcount.open(cluster.sup.store_url, node="html-writer", flush_interval=None)
    try:
        family = reg.counter(
            "ui_html_total", f"help with {BOLD} and {IMG}", labelnames=["note", "shop"]
        )
        family.labels(note=BOLD, shop=IMG).inc(3)
        reg.commit_sync()
    finally:
        reg.close()
    asyncio.run(_escaping(cluster))


async def _escaping(cluster: LiveCluster) -> None:
    spec = cluster.spec
    async with aiohttp.ClientSession() as session:
        body = {"labels": {"shop": IMG, "note": BOLD}, "by": 2}
        async with session.post(f"{spec.lb_url}/v1/counters/ui_labels_total/increment",
                                json=body) as r:  # fmt: skip
            assert r.status == 200, await r.text()
    async with Browser.open() as browser:
        # The cluster's page, then a node's (through the balancer): only the
        # node's page has the help texts (it reads the store itself).
        pages = [(f"{spec.api_url}/ui", "cluster"), (f"{spec.lb_url}/ui", "node")]
        for url, source in pages:
            await browser.call("goto", url=url)
            wanted = [IMG, BOLD] + ([f"help with {BOLD} and {IMG}"] if source == "node" else [])
            await browser.wait(
                f"(() => {{ const text = document.body.textContent;"
                f" return window.keepcountState && window.keepcountState.source === {json.dumps(source)}"
                f" && {json.dumps(wanted)}.every(w => text.includes(w))"
                " && ['ui_html_total', 'ui_labels_total'].every(n =>"
                ' document.querySelector(`.counter[data-counter="${n}"]`)); })()',
                90,
                f"the {source} page shows the HTML as text",
            )
            assert await browser.eval("typeof window.pwned") == "undefined"
            injected = await browser.eval("document.querySelectorAll('main img, main b').length")
            assert injected == 0, "no element was made of a label value or a help text"
            labels = await browser.eval(
                "[...document.querySelectorAll('.counter[data-counter=\"ui_html_total\"] td.labels')]"
                ".map(td => td.textContent)"
            )
            assert labels == [f'note="{BOLD}", shop="{IMG}"'], labels
            for name in ("ui_html_total", "ui_labels_total"):
                lo, hi = await browser.eval(f"window.keepcountXRange({json.dumps(name)})")
                assert 0 < hi - lo <= 900, f"{name}: the chart spans {hi - lo} s, not minutes"
            if source == "node":
                states = dict(await browser.eval(rows_js()))
                assert states.get("html-writer") == "released", states
            await browser.screenshot(f"ui-escaping-{source}.png")
        assert await browser.errors() == []
