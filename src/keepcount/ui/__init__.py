"""The live page for operators: ``GET /ui`` on every node and on a cluster's supervisor.

One static page (``index.html``, ``ui.js``, ``ui.css`` and the vendored
uPlot, all package data) that polls ``state.json`` next to it about once a
second and shows the nodes (state, epoch, uptime, restarts), the load
balancer's view of its backends, the cluster totals of each counter with
each node's part, and a chart per counter over the last minutes with the
nodes' restarts marked.

- ``keepcount.ui.assets``: the files and their routes (``asset_routes()``).
- ``keepcount.ui.state``: the ``state.json`` document, one schema for both
  servers (``cluster_state``, ``node_state``), and ``Transitions``, each
  node's recent state changes.

The node (``keepcount.node``) and the supervisor's control API
(``keepcount.cluster.api``) each add ``GET /ui/state.json`` built with
these; this package imports neither.
"""

from __future__ import annotations

from keepcount.ui.assets import ASSETS, PAGE_PATH, STATE_PATH, asset_routes, read_asset
from keepcount.ui.state import (
    CLUSTER_STATES,
    HISTORY_SECONDS,
    MAX_EVENTS,
    MAX_SERIES,
    NODE_STATES,
    STATE_SCHEMA,
    TimedCache,
    Transitions,
    cluster_counters,
    cluster_state,
    node_state,
    series_counters,
)

__all__ = [
    "ASSETS",
    "CLUSTER_STATES",
    "HISTORY_SECONDS",
    "MAX_EVENTS",
    "MAX_SERIES",
    "NODE_STATES",
    "PAGE_PATH",
    "STATE_PATH",
    "STATE_SCHEMA",
    "TimedCache",
    "Transitions",
    "asset_routes",
    "cluster_counters",
    "cluster_state",
    "node_state",
    "read_asset",
    "series_counters",
]
