"""``state.json``: the document behind the live page, one schema for both servers.

The supervisor of a local cluster (``source: "cluster"``, served by its
control API) and every node (``source: "node"``) answer ``GET
/ui/state.json`` with the same shape, so one page renders either::

    {
      "source": "cluster" | "node",
      "time": 1718000000.123,        # the server's wall clock (s): the charts' x axis
      "self": "node-1" | null,       # node source: the node that answered
      "nodes": [{
        "id": "node-1",
        "state": "ready",            # see NODE_STATES
        "since": 1717999990.5,       # when that state began, if known
        "epoch": 7, "uptime": 12.3, "restarts": 2, "pid": 4242,
        "slot": "node-1.a", "incarnation": 3,   # null where the source does not know
        "detail": "..." | null,      # why it is not ready, in words
        "history": [{"t": 1717999990.5, "state": "ready"}, ...]
      }],
      "lb": {"kind": "haproxy", "url": "http://...", "backends": {"node-1.a": "UP"},
             "standby": ["node-1.b"],   # backends no incarnation holds (shown as standby)
             "error": "..."?} | null,
      "counters": [{"name", "help", "labels": {...}, "value": 12,
                    "nodes": {"node-1": 5, "node-2": 7}}],
      "counters_time": 1718000000.1 | null,  # when the totals were read (the points' x)
      "counters_error": "..." | null,   # why the counters are missing or stale
      "truncated": 0,                # series left out (more than MAX_SERIES)
      "events": [{"t", "event", "node", ...}]   # the supervisor's latest; [] from a node
    }

``counters`` are the cluster totals (G5: the sum over every node the store
has seen, dead and released ones included), counters only (histograms are
left to ``/metrics``), at most ``MAX_SERIES`` of them in name order.

Everything in it is data to be shown as text: the page never parses a name, a
label value or a help text as HTML.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from keepcount.stores.base import NodeRecord
    from keepcount.totals import SeriesTotal

__all__ = [
    "CLUSTER_STATES",
    "HISTORY_SECONDS",
    "MAX_EVENTS",
    "MAX_SERIES",
    "NODE_STATES",
    "STATE_SCHEMA",
    "TimedCache",
    "Transitions",
    "cluster_counters",
    "cluster_state",
    "node_state",
    "series_counters",
]

CLUSTER_STATES = ("starting", "restoring", "ready", "unresponsive", "paused", "fenced", "down")
"""States the supervisor reports: a process was started but does not answer
HTTP yet (starting), answers but is not ready (restoring: claiming its id and
loading its counters), ready, its ``/readyz`` timed out (unresponsive),
stopped with SIGSTOP (paused), replaced after losing its claim (fenced), no
process (down: exited, a new incarnation is about to start)."""

NODE_STATES = (*CLUSTER_STATES, "unconfirmed", "claimed", "released")
"""Every state the page may show.  A node reporting on itself adds
unconfirmed (it holds its claim but the coordinator has not confirmed it in
time: it acknowledges nothing); the other nodes it knows only from the
store's records: claimed (an incarnation holds the id) or released (shut
down cleanly)."""

MAX_SERIES = 2000
"""Counter series sent to the page; a registry may hold far more, a page
listing them would be of no use to an operator."""

MAX_EVENTS = 40
"""Supervisor events sent to the page (the newest)."""

HISTORY_SECONDS = 900.0
"""Seconds of state changes kept per node: a page opened after a restart
still shows it on the charts (which span the last minutes)."""

_MAX_TRANSITIONS = 500  # per node: a node flapping every 100 ms must not grow a page without end

_STATE = {"enum": list(NODE_STATES)}
_OPT_INT = {"type": ["integer", "null"]}
_OPT_STR = {"type": ["string", "null"]}
_OPT_TIME = {"type": ["number", "null"]}
_STRINGS = {"type": "object", "additionalProperties": {"type": "string"}}

STATE_SCHEMA: dict[str, Any] = {
    "title": "keepcount live page state",
    "description": "GET /ui/state.json, from a node or from a cluster's supervisor "
    "(see the module keepcount.ui.state).",
    "type": "object",
    "required": [
        "source",
        "time",
        "self",
        "nodes",
        "lb",
        "counters",
        "counters_time",
        "counters_error",
        "truncated",
        "events",
    ],
    "additionalProperties": False,
    "properties": {
        "source": {"enum": ["cluster", "node"]},
        "time": {"type": "number", "description": "The server's wall clock, in seconds."},
        "self": {**_OPT_STR, "description": "The node that answered (null: the supervisor)."},
        "nodes": {
            "type": "array",
            "items": {
                "type": "object",
                "required": [
                    "id",
                    "state",
                    "since",
                    "epoch",
                    "uptime",
                    "restarts",
                    "pid",
                    "slot",
                    "incarnation",
                    "detail",
                    "history",
                ],
                "additionalProperties": False,
                "properties": {
                    "id": {"type": "string"},
                    "state": _STATE,
                    "since": _OPT_TIME,
                    "epoch": _OPT_INT,
                    "uptime": {"type": ["number", "null"], "minimum": 0},
                    "restarts": {"type": ["integer", "null"], "minimum": 0},
                    "pid": _OPT_INT,
                    "slot": _OPT_STR,
                    "incarnation": _OPT_INT,
                    "detail": _OPT_STR,
                    "history": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "required": ["t", "state"],
                            "additionalProperties": False,
                            "properties": {"t": {"type": "number"}, "state": _STATE},
                        },
                    },
                },
            },
        },
        "lb": {
            "oneOf": [
                {"type": "null"},
                {
                    "type": "object",
                    "required": ["kind", "url", "backends"],
                    "additionalProperties": False,
                    "properties": {
                        "kind": _OPT_STR,
                        "url": _OPT_STR,
                        "backends": _STRINGS,
                        "standby": {
                            "type": "array",
                            "items": {"type": "string"},
                            "description": "Backends (slots) that no incarnation holds: "
                            "waiting for the next one, not down.",
                        },
                        "error": {"type": "string"},
                    },
                },
            ]
        },
        "counters": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["name", "help", "labels", "value", "nodes"],
                "additionalProperties": False,
                "properties": {
                    "name": {"type": "string"},
                    "help": {"type": "string"},
                    "labels": _STRINGS,
                    "value": {"type": "integer", "minimum": 0},
                    "nodes": {
                        "type": "object",
                        "additionalProperties": {"type": "integer", "minimum": 0},
                    },
                },
            },
        },
        "counters_time": _OPT_TIME,
        "counters_error": _OPT_STR,
        "truncated": {"type": "integer", "minimum": 0},
        "events": {"type": "array", "items": {"type": "object"}},
    },
}
"""JSON Schema (2020-12) of the document; the OpenAPI document of a node uses it."""


class Transitions:
    """Each node's recent state changes, in time order.

    The page polls about once a second; a node that was killed and came back
    passes through ``down`` and ``restoring`` in less than that.  Whoever
    knows the states (the supervisor's API sampling its nodes, a node
    looking at itself) records them here, and every document carries them,
    so the page shows each state a node went through, not only the ones that
    happened to be current when it asked.

    Example::

        tr = Transitions()
        tr.observe("node-1", "ready", 10.0)
        tr.observe("node-1", "ready", 11.0)      # no change: not recorded
        tr.observe("node-1", "down", 12.0)
        tr.history("node-1", now=13.0)
        # [{"t": 10.0, "state": "ready"}, {"t": 12.0, "state": "down"}]
    """

    def __init__(self, keep: float = HISTORY_SECONDS) -> None:
        self.keep = keep
        self._nodes: dict[str, deque[tuple[float, str]]] = {}

    def observe(self, node: str, state: str, t: float) -> bool:
        """Record that ``node`` is in ``state`` at ``t``; True if it changed.

        Times are expected in order per node; an observation older than the
        last one recorded is ignored (it would rewrite history)."""
        log = self._nodes.setdefault(node, deque(maxlen=_MAX_TRANSITIONS))
        if log and (log[-1][1] == state or t < log[-1][0]):
            return False
        log.append((t, state))
        return True

    def current(self, node: str) -> tuple[float, str] | None:
        """(since, state) of the last change recorded for ``node``."""
        log = self._nodes.get(node)
        return log[-1] if log else None

    def history(self, node: str, now: float | None = None) -> list[dict[str, Any]]:
        """``node``'s changes within ``keep`` seconds of ``now`` (the last one
        always: it says since when the current state holds)."""
        log = self._nodes.get(node)
        if not log:
            return []
        now = time.time() if now is None else now
        while len(log) > 1 and log[0][0] < now - self.keep:
            log.popleft()
        return [{"t": round(t, 3), "state": s} for t, s in log]


class TimedCache:
    """The last value of an expensive read, reused for ``ttl`` seconds.

    A page polls once a second and several may be open: the store is read
    at most once per ``ttl`` whatever the number of pages.

    Example::

        cache = TimedCache(0.5)
        doc = await cache.get(read_the_store)   # read once, then reused
    """

    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self._value: Any = None
        self._at: float | None = None
        self._pending: asyncio.Future[Any] | None = None

    async def get(self, load: Callable[[], Awaitable[Any]]) -> Any:
        """The cached value if younger than ``ttl``, else ``await load()``.

        One load at a time: callers that arrive while one runs share its
        result (reads never overlap, so a later answer never holds older
        values than an earlier one).  A load that raises is not cached."""
        if self._at is not None and time.monotonic() - self._at < self.ttl:
            return self._value
        pending = self._pending
        if (
            pending is None
            or pending.done()
            or pending.get_loop() is not asyncio.get_running_loop()
        ):
            pending = self._pending = asyncio.ensure_future(self._load(load))
        return await asyncio.shield(pending)

    async def _load(self, load: Callable[[], Awaitable[Any]]) -> Any:
        value = await load()
        self._value, self._at = value, time.monotonic()
        return value


def _entries(
    rows: Iterable[tuple[str, Any, str, Mapping[str, str], Any, Mapping[str, Any]]],
) -> tuple[list[dict[str, Any]], int]:
    """The page's entries of ``(kind, name, help, labels, value, nodes)``
    rows: counters with an integer value, at most ``MAX_SERIES``; and how
    many were left out."""
    out: list[dict[str, Any]] = []
    left = 0
    for kind, name, text, labels, value, nodes in rows:
        if kind != "counter" or not isinstance(value, int):
            continue
        if len(out) >= MAX_SERIES:
            left += 1
            continue
        parts = {k: v for k, v in nodes.items() if isinstance(v, int)}
        out.append(
            {
                "name": str(name),
                "help": str(text),
                "labels": dict(labels),
                "value": value,
                "nodes": dict(sorted(parts.items())),
            }
        )
    return out, left


def cluster_counters(items: Iterable[Mapping[str, Any]]) -> tuple[list[dict[str, Any]], int]:
    """The counters of a ``GET /v1/cluster/counters`` answer (its ``counters``
    list) as the page's entries, and how many series were left out."""
    return _entries(
        (i.get("kind", "counter"), i["name"], i.get("help", ""), i.get("labels", {}),
         i.get("value"), i.get("nodes", {}))
        for i in items
    )  # fmt: skip


def series_counters(
    totals: Iterable[SeriesTotal], helps: Mapping[str, str]
) -> tuple[list[dict[str, Any]], int]:
    """The counters among ``totals`` (``Registry.cluster()``) as the page's
    entries, with each name's help text from ``helps``; and how many series
    were left out."""
    return _entries(
        (t.kind, t.name, helps.get(t.name, ""), t.labels, t.value, t.nodes) for t in totals
    )


def _event(ev: Mapping[str, Any]) -> dict[str, Any]:
    # ``mono`` is the supervisor's monotonic clock: meaningless to a browser.
    return {k: v for k, v in ev.items() if k != "mono"}


def _held_slots(nodes: Iterable[Mapping[str, Any]]) -> set[str]:
    """The balancer slots an incarnation holds: each node's current one, and
    those of old incarnations still alive.  A node has two slots so that a
    new incarnation can start beside the old one; the other is on standby."""
    held = {str(n["slot"]) for n in nodes if n.get("slot")}
    for n in nodes:
        held.update(str(o["slot"]) for o in n.get("stale") or () if o.get("slot"))
    return held


def cluster_state(
    status: Mapping[str, Any],
    counters: Mapping[str, Any] | None,
    events: Iterable[Mapping[str, Any]],
    transitions: Transitions,
    *,
    now: float | None = None,
    counters_time: float | None = None,
    counters_error: str | None = None,
) -> dict[str, Any]:
    """The document from a supervisor: its ``status()``, the cluster totals
    as a node answers them (``Supervisor.counters()``, None if no node
    could), its events (oldest first) and the nodes' state changes."""
    now = time.time() if now is None else now
    nodes = []
    for n in status.get("nodes", []):
        node_id = str(n["id"])
        since = transitions.current(node_id)
        detail = None
        stale = n.get("stale") or []
        if stale:
            detail = "old incarnation(s) still alive: " + ", ".join(
                f"pid {o.get('pid')} ({o.get('state')})" for o in stale
            )
        nodes.append(
            {
                "id": node_id,
                "state": n.get("state", "down"),
                "since": None if since is None else round(since[0], 3),
                "epoch": n.get("epoch"),
                "uptime": n.get("uptime"),
                "restarts": n.get("restarts"),
                "pid": n.get("pid"),
                "slot": n.get("slot"),
                "incarnation": n.get("incarnation"),
                "detail": detail,
                "history": transitions.history(node_id, now),
            }
        )
    lb = status.get("lb")
    lb_doc = None
    if lb is not None:
        backends = lb.get("backends", {})
        held = _held_slots(status.get("nodes", []))
        lb_doc = {
            "kind": lb.get("kind"),
            "url": lb.get("url"),
            "backends": backends,
            "standby": sorted(name for name in backends if name not in held),
        }
        if "error" in lb:
            lb_doc["error"] = str(lb["error"])
    entries: list[dict[str, Any]] = []
    left = 0
    if counters is not None:
        entries, left = cluster_counters(counters.get("counters", []))
    elif counters_error is None:
        counters_error = "no node is ready to read the cluster totals from"
    recent = list(events)[-MAX_EVENTS:]
    return {
        "source": "cluster",
        "time": round(now, 3),
        "self": None,
        "nodes": nodes,
        "lb": lb_doc,
        "counters": entries,
        "counters_time": None
        if counters is None or counters_time is None
        else round(counters_time, 3),
        "counters_error": counters_error,
        "truncated": left,
        "events": [_event(e) for e in recent],
    }


def node_state(
    node: str,
    state: str,
    *,
    detail: str | None,
    epoch: int | None,
    uptime: float,
    pid: int,
    transitions: Transitions,
    records: Iterable[NodeRecord] = (),
    counters: list[dict[str, Any]] | None = None,
    truncated: int = 0,
    counters_time: float | None = None,
    counters_error: str | None = None,
    now: float | None = None,
) -> dict[str, Any]:
    """The document from one node: itself (``state``, see ``NODE_STATES``),
    the other node ids of its store (``Store.nodes()``: claimed or released;
    restarts, pids and slots unknown), and the cluster totals (entries from
    ``series_counters``; None: not read, ``counters_error`` says why)."""
    now = time.time() if now is None else now
    since = transitions.current(node)
    mine: dict[str, Any] = {
        "id": node,
        "state": state,
        "since": None if since is None else round(since[0], 3),
        "epoch": epoch,
        "uptime": round(uptime, 3),
        "restarts": None,
        "pid": pid,
        "slot": None,
        "incarnation": None,
        "detail": detail,
        "history": transitions.history(node, now),
    }
    others: list[dict[str, Any]] = []
    for r in sorted(records, key=lambda r: r.node):
        if r.node == node:
            continue
        released = r.released_at is not None and (
            r.claimed_at is None or r.released_at >= r.claimed_at
        )
        at = r.released_at if released else r.claimed_at
        others.append(
            {
                "id": r.node,
                "state": "released" if released else "claimed",
                "since": None if at is None else round(at, 3),
                "epoch": r.epoch,
                "uptime": None,
                "restarts": None,
                "pid": None,
                "slot": None,
                "incarnation": None,
                "detail": None,
                "history": [],
            }
        )
    if counters is None and counters_error is None:
        counters_error = f"node {node} is not ready: it cannot read the store yet"
    return {
        "source": "node",
        "time": round(now, 3),
        "self": node,
        "nodes": [mine, *others],
        "lb": None,
        "counters": counters or [],
        "counters_time": None
        if counters is None or counters_time is None
        else round(counters_time, 3),
        "counters_error": counters_error,
        "truncated": truncated,
        "events": [],
    }
