"""``GET /ui/state.json`` of a node: the live page's document (``keepcount.ui.state``).

This node (its ``NodeState`` as the page names it, and why it is not
ready), the store's other node ids and the cluster totals.  Served while
not ready too (an operator wants to watch a node restore); off the
increment path: the store is read in a thread, at most every
``READ_EVERY`` seconds whatever the number of pages open.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from keepcount.errors import KeepcountError
from keepcount.totals import cluster_totals
from keepcount.ui import TimedCache, node_state
from keepcount.ui import series_counters as ui_counters

if TYPE_CHECKING:
    from keepcount.node.lifecycle import Lifecycle
    from keepcount.registry import Registry
    from keepcount.stores.base import NodeRecord

__all__ = ["READ_EVERY", "LivePage"]

READ_EVERY = 0.5
"""Seconds: the page's document reads the store at most this often."""

_HEADERS = {"content-type": "application/json", "cache-control": "no-store"}
_encode = msgspec.json.Encoder().encode


@dataclass(frozen=True, slots=True)
class _Read:
    """What the live page needs from the store, read at ``time``."""

    time: float
    records: list[NodeRecord]
    counters: list[dict[str, Any]]
    truncated: int


class LivePage:
    """The document of one node's live page, from its ``Lifecycle``."""

    def __init__(self, node: Lifecycle) -> None:
        self.node = node
        self._started = time.monotonic()
        self._read = TimedCache(READ_EVERY)

    async def answer(self, request: Request) -> Response:
        node = self.node
        state, detail = node.state.page_state, node.why_not_ready()
        reg = node.registry
        read: _Read | str | None = None
        if reg is not None and not reg.closed:
            read = await self._read.get(lambda: asyncio.to_thread(_read_store, reg))
        epoch = reg.epoch if reg is not None else (node.claim.epoch if node.claim else None)
        common: dict[str, Any] = {
            "detail": detail,
            "epoch": epoch,
            "uptime": time.monotonic() - self._started,
            "pid": os.getpid(),
            "transitions": node.transitions,
        }
        if isinstance(read, _Read):
            doc = node_state(
                node.config.node, state, records=read.records, counters=read.counters,
                truncated=read.truncated, counters_time=read.time, **common,
            )  # fmt: skip
        else:
            doc = node_state(node.config.node, state, counters_error=read, **common)
        return Response(_encode(doc), 200, _HEADERS)


def _read_store(reg: Registry) -> _Read | str:
    """The store's node records and cluster totals (in a thread: it reads
    the store); a message if the store failed."""
    started = time.time()
    try:
        snapshot = reg.store.read_cluster()
        records = reg.store.nodes()
    except KeepcountError as exc:
        return f"reading the store failed: {exc}"
    helps: dict[str, str] = {}
    for families in snapshot.families.values():
        for name, definition in families.items():
            if definition.help and name not in helps:
                helps[name] = definition.help
    counters, truncated = ui_counters(cluster_totals(snapshot), helps)
    return _Read(started, records, counters, truncated)
