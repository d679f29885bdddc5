"""Cluster totals of the Cassandra store without reading every node's every
row on every call: a partition is read again only if it changed.

Each node's partition has a static ``version`` cell, written in the same
single-partition batch as every flush (at the flush's timestamp) and by
every claim's fence (at its base).  ``read_cluster`` first reads, for every
node at once, the partition's static cells only (``SELECT DISTINCT``: one
small read per node), and reads the rows of a partition (or of one family
of it) only if its ``(fence, version)`` differs from the one it cached.

Why a cached partition is exact while its ``(fence, version)`` stays the
same: every batch that counts under the read rule writes ``version`` at its
own timestamp, and last-write-wins keeps the highest.  A batch that lands
with a higher timestamp than the cached version changes the version.  One
that lands with a lower timestamp is either below the fence (counted only
through the checkpoint: changes nothing) or a flush of the current
incarnation that landed after a later one: its writer had it fail
(``OutcomeUnknown``) and wrote every series of it again in that later flush
(``Store.write``'s contract, what ``GroupCommit`` does), whose cells win.
A partition without a version (format 1) is read every time.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

from keepcount.stores.base import ClusterSnapshot, FamilyDef, SeriesValue
from keepcount.stores.cassandra.fence import Gather, read_views

__all__ = ["TotalsCache"]


@dataclass(frozen=True, slots=True)
class _Part:
    fence: int | None
    version: int | None
    families: dict[str, FamilyDef]
    rows: list[tuple[str, str, SeriesValue]]


class TotalsCache:
    """``read_cluster`` of one store handle (see the module docstring); thread-safe."""

    def __init__(self, url: str, statements: Any) -> None:
        self._url = url
        self._f = statements
        self._lock = threading.Lock()
        self._parts: dict[tuple[str, str | None], _Part] = {}
        self.reads = 0
        """Partitions (or families of one) read so far: what the cache saves."""

    def read(self, nodes: list[str], name: str | None, gather: Gather) -> ClusterSnapshot:
        heads = gather([(self._f.head, (node,)) for node in nodes])
        stale: list[tuple[str, Any]] = []
        parts: dict[str, _Part] = {}
        with self._lock:
            for node, head in zip(nodes, heads, strict=True):
                fence, version = (head[0].fence, head[0].version) if head else (None, None)
                part = self._parts.get((node, name))
                if (
                    version is not None
                    and part is not None
                    and (part.fence, part.version)
                    == (
                        fence,
                        version,
                    )
                ):
                    parts[node] = part
                else:
                    stale.append((node, (fence, version)))
        views = read_views(self._url, self._f, gather, [node for node, _ in stale], name)
        for (node, (fence, version)), view in zip(stale, views, strict=True):
            # What was read is at least as new as the head read before it: a
            # version that moved on meanwhile only makes the next call read again.
            part = _Part(
                fence,
                version,
                view.families,
                [
                    (m, labels, v)
                    for m, series in view.values.items()
                    for labels, v in series.items()
                ],
            )
            parts[node] = part
        with self._lock:
            self.reads += len(stale)
            for node, _ in stale:
                self._parts[(node, name)] = parts[node]
        snap = ClusterSnapshot()
        for node in nodes:
            part = parts[node]
            if part.families:
                snap.families[node] = part.families
            snap.rows.extend((node, m, labels, v) for m, labels, v in part.rows)
        snap.rows.sort()
        return snap
