"""Cluster totals: the sum over every node's absolute values (a G-counter).

Each node writes only its own rows, so a total is the sum of per-node
components; dead and released nodes count, since their increments happened.
Only native kinds (``counter``, ``histogram``) are summed: families of other
kinds (``prometheus.*``, opaque to keepcount) are left out.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from keepcount.metrics import HistogramValue, decode_label_key
from keepcount.slots import host_of
from keepcount.stores.base import ClusterSnapshot, FamilyDef, Store, is_native_kind

__all__ = ["SeriesTotal", "cluster_totals", "host_snapshot"]


@dataclass(slots=True)
class SeriesTotal:
    """One series summed over nodes, with each node's part."""

    name: str
    kind: str
    labels: dict[str, str]
    value: int | HistogramValue
    nodes: dict[str, int | HistogramValue] = field(default_factory=dict)
    buckets: tuple[float, ...] = ()
    """Histogram upper bounds (ending with +Inf); empty for counters."""


def cluster_totals(snapshot: ClusterSnapshot) -> list[SeriesTotal]:
    """Sum ``snapshot`` per (name, labels); histograms bucket by bucket.

    Nodes that declared the same name with another shape (kind, label names,
    buckets) are summed separately: their values cannot be added.  Rows of
    families of a non-native kind are skipped.
    """
    out: dict[tuple[object, ...], SeriesTotal] = {}
    for node, name, key, raw in snapshot.rows:
        definition = snapshot.families.get(node, {}).get(name)
        if definition is None or not is_native_kind(definition.kind):
            continue
        labels = dict(zip(definition.labelnames, decode_label_key(key), strict=True))
        group = (name, definition.kind, definition.buckets, tuple(sorted(labels.items())))
        value = _value(definition, raw)
        total = out.get(group)
        if total is None:
            zero: int | HistogramValue = (
                0 if definition.kind == "counter"
                else HistogramValue([0] * len(definition.buckets), 0.0)
            )  # fmt: skip
            total = out[group] = SeriesTotal(
                name, definition.kind, labels, zero, buckets=definition.buckets
            )
        total.nodes[node] = value
        total.value = _add(total.value, value)
    return sorted(out.values(), key=lambda t: (t.name, sorted(t.labels.items())))


def _value(definition: FamilyDef, raw: int | str) -> int | HistogramValue:
    if definition.kind == "counter":
        assert isinstance(raw, int)
        return raw
    return HistogramValue.decode(raw, len(definition.buckets))


def _add(a: int | HistogramValue, b: int | HistogramValue) -> int | HistogramValue:
    if isinstance(a, int) and isinstance(b, int):
        return a + b
    assert isinstance(a, HistogramValue) and isinstance(b, HistogramValue)
    return HistogramValue([x + y for x, y in zip(a.counts, b.counts, strict=True)], a.sum + b.sum)


def host_snapshot(store: Store, host: str, name: str | None = None) -> ClusterSnapshot:
    """The rows of every slot of ``host`` (``keepcount.slots``), dead ones
    too, and nothing of other hosts: a host's scrape costs its own rows,
    however many hosts share the store.  Each slot is read on its own; as
    its values only grow, sums over such reads only grow too."""
    snap = ClusterSnapshot()
    for record in store.nodes():
        if host_of(record.node) != host:
            continue
        stored = store.load(record.node)
        families = stored.families if name is None else {
            n: d for n, d in stored.families.items() if n == name
        }  # fmt: skip
        snap.families[record.node] = families
        for fname in families:
            for key, value in stored.values.get(fname, {}).items():
                snap.rows.append((record.node, fname, key, value))
    return snap
