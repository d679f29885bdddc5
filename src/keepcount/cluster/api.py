"""The supervisor's control API, for ``keepcount cluster status|kill|restart|down``.

Served on ``spec.api_port`` (127.0.0.1) by uvicorn inside the supervisor's
event loop.  Every answer is JSON; errors are ``{"error": {"code",
"message"}}`` like the node's.

- ``GET /api/status`` — nodes (state, pid, slot, epoch, incarnation,
  restarts, uptime), the load balancer's view of its backends, the
  coordinator's members; ``?counters=1`` adds the cluster totals.
- ``GET /api/events?since=SEQ`` — the supervisor's events after ``SEQ``.
- ``POST /api/nodes/{node}/signal`` ``{"signal": "KILL"|"STOP"|"CONT"|"TERM"}``
  — answers once the effect is seen.
- ``POST /api/nodes/{node}/restart`` — graceful stop, answers once the new
  incarnation is ready.
- ``POST /api/down`` — tear the whole cluster down (answers at once).
- ``GET /ui`` — the live page for operators (``keepcount.ui``), and
  ``GET /ui/state.json``, its document (source ``cluster``): the nodes with
  their state changes, the load balancer's view, the cluster totals, the
  latest events.  A node passes through ``down``, ``starting`` and
  ``restoring`` in well under the page's poll interval; ``ClusterView``
  records every state the supervisor sees (its events, and a look at the
  nodes every ``UI_SAMPLE_EVERY`` seconds) so that the page shows them all.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from keepcount.cluster.launcher import NodeState
from keepcount.cluster.spec import ClusterSpec
from keepcount.errors import InvalidInput
from keepcount.ui import STATE_PATH, TimedCache, Transitions, asset_routes, cluster_state

__all__ = [
    "UI_COUNTERS_EVERY",
    "UI_SAMPLE_EVERY",
    "ClusterControl",
    "ClusterView",
    "create_api",
    "serve_api",
]

UI_SAMPLE_EVERY = 0.05
"""Seconds between two looks at the nodes' states for the live page: half the
supervisor's ``/readyz`` probe period, so no state it sees is missed."""
UI_COUNTERS_EVERY = 0.5
"""Seconds the cluster totals are reused for: however many pages are open, a
node is asked for them at most this often."""

_EVENT_STATES = {"exited": "down", "started": "starting", "ready": "ready", "claim_lost": "fenced"}
"""Supervisor events that say a node's state changed, at the event's time.
A killed node is ``down`` for one detector tick (20 ms) before its restart:
only the event tells.  A first ``ready`` also tells when the node began
restoring and when it finished (its ``/readyz``): a restore is often shorter
than a probe period."""


class ClusterControl(Protocol):
    """What the API and the live page need of a supervisor
    (``keepcount.cluster.supervisor.Supervisor`` is one): its nodes and
    events to read, its verbs to call.  The supervisor imports this module,
    never the other way round."""

    @property
    def spec(self) -> ClusterSpec: ...

    @property
    def nodes(self) -> Mapping[str, NodeState]: ...

    @property
    def events(self) -> Sequence[dict[str, Any]]:
        """The latest events, oldest first (each with its ``seq``)."""
        ...

    @property
    def event_count(self) -> int:
        """The last event's ``seq``."""
        ...

    def status(self) -> dict[str, Any]: ...

    async def counters(self) -> dict[str, Any] | None: ...

    async def signal(self, node: str, name: str) -> dict[str, Any]: ...

    async def restart(self, node: str) -> dict[str, Any]: ...

    def stop(self) -> None: ...


def _error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status)


class ClusterView:
    """The live page's view of a supervised cluster (``keepcount.ui.state``,
    source ``cluster``): ``document()`` builds ``state.json``; ``run()``
    samples the nodes' states in the background so that the page can show
    states shorter than its poll interval.

    Example::

        view = ClusterView(sup)
        task = asyncio.create_task(view.run())     # in the supervisor's loop
        doc = await view.document()
    """

    def __init__(self, sup: ClusterControl) -> None:
        self.sup = sup
        self.transitions = Transitions()
        self._seq = 0
        self._counters = TimedCache(UI_COUNTERS_EVERY)

    def sample(self) -> None:
        """Record the state changes the supervisor's new events tell, then each
        node's current state (in that order: times only grow)."""
        sup = self.sup
        if sup.event_count != self._seq:
            for ev in list(sup.events):  # a copy: events may be appended from a thread
                if ev["seq"] <= self._seq:
                    continue
                self._seq = ev["seq"]
                state = _EVENT_STATES.get(ev["event"])
                node = ev.get("node")
                if state is None or not isinstance(node, str) or node not in sup.nodes:
                    continue
                t = ev["t"]
                since, ready_at = ev.get("restoring_since"), ev.get("ready_at")
                if (
                    state == "ready"
                    and ev.get("first")
                    and isinstance(since, int | float)
                    and isinstance(ready_at, int | float)
                ):
                    # A restore is often shorter than a probe period: the probe
                    # never sees it; the node's own clock tells when it ran.
                    self.transitions.observe(node, "restoring", since)
                    t = ready_at
                self.transitions.observe(node, state, t)
        now = time.time()
        for node, ns in sup.nodes.items():
            cur = ns.current
            self.transitions.observe(node, "down" if cur is None else cur.state(), now)

    async def run(self) -> None:
        """Sample every ``UI_SAMPLE_EVERY`` seconds until cancelled."""
        while True:
            self.sample()
            await asyncio.sleep(UI_SAMPLE_EVERY)

    async def _read_counters(self) -> tuple[float, dict[str, Any] | None, str | None]:
        started = time.time()
        try:
            return started, await self.sup.counters(), None
        except Exception as exc:  # the page says why instead of failing
            return started, None, f"reading the cluster totals failed: {exc}"

    async def document(self) -> dict[str, Any]:
        """``state.json`` as of now."""
        self.sample()
        status = self.sup.status()
        read_at, counters, error = await self._counters.get(self._read_counters)
        return cluster_state(
            status, counters, list(self.sup.events), self.transitions,
            counters_time=read_at, counters_error=error,
        )  # fmt: skip


def create_api(sup: ClusterControl) -> Starlette:
    async def status(request: Request) -> JSONResponse:
        body = sup.status()
        if request.query_params.get("counters"):
            body["counters"] = await sup.counters()
        return JSONResponse(body)

    async def events(request: Request) -> JSONResponse:
        try:
            since = int(request.query_params.get("since", "0"))
        except ValueError:
            return _error(400, "invalid_input", "since must be an integer")
        return JSONResponse({"events": [e for e in sup.events if e["seq"] > since]})

    async def send_signal(request: Request) -> JSONResponse:
        try:
            body: Any = json.loads(await request.body() or b"{}")
            name = body["signal"] if isinstance(body, dict) else None
            if not isinstance(name, str):
                raise InvalidInput('the body must be {"signal": "KILL"|"STOP"|"CONT"|"TERM"}')
            return JSONResponse(await sup.signal(request.path_params["node"], name))
        except (ValueError, KeyError) as exc:  # InvalidInput is a ValueError
            return _error(422, "invalid_input", str(exc))
        except TimeoutError as exc:
            return _error(504, "timeout", str(exc))

    async def restart(request: Request) -> JSONResponse:
        try:
            return JSONResponse(await sup.restart(request.path_params["node"]))
        except InvalidInput as exc:
            return _error(422, "invalid_input", str(exc))
        except TimeoutError as exc:
            return _error(504, "timeout", str(exc))

    async def down(request: Request) -> JSONResponse:
        sup.stop()
        return JSONResponse({"status": "stopping"}, 202)

    view = ClusterView(sup)

    async def ui_state(request: Request) -> JSONResponse:
        return JSONResponse(await view.document(), headers={"cache-control": "no-store"})

    app = Starlette(
        routes=[
            Route("/api/status", status, methods=["GET"]),
            Route("/api/events", events, methods=["GET"]),
            Route("/api/nodes/{node}/signal", send_signal, methods=["POST"]),
            Route("/api/nodes/{node}/restart", restart, methods=["POST"]),
            Route("/api/down", down, methods=["POST"]),
            Route(STATE_PATH, ui_state, methods=["GET"]),
            *asset_routes(),
        ]
    )
    app.state.ui = view
    return app


class _Server(uvicorn.Server):
    # The supervisor owns SIGTERM/SIGINT (they tear the cluster down).
    def capture_signals(self) -> Any:
        return contextlib.nullcontext()


async def serve_api(sup: ClusterControl) -> None:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((sup.spec.host, sup.spec.api_port))
    app = create_api(sup)
    config = uvicorn.Config(app, lifespan="off", access_log=False, log_level="warning", loop="none")
    server = _Server(config)
    sampler = asyncio.create_task(app.state.ui.run(), name="keepcount-ui-sampler")
    try:
        await server.serve(sockets=[sock])
    finally:
        sampler.cancel()
        await asyncio.gather(sampler, return_exceptions=True)
        sock.close()
