# mypy: disable-error-code="no-untyped-call"
"""A host's metrics: every slot's stored series combined per metric type.

What prometheus_client's multiprocess collector does with its processes'
files, done with a host's slots (``keepcount.slots``):

- counters, summaries (count and sum) and histograms (each bucket and the
  sum) are **summed** over every slot, dead ones included: what a dead
  worker counted happened.  ``_created`` is the earliest slot's.
- gauges follow their ``multiprocess_mode``: ``all`` gives one series per
  slot with the label ``pid`` (holding the slot id: a slot outlives its
  processes), ``min``/``max``/``sum`` combine the slots, ``mostrecent`` takes
  the value set last; the ``live*`` modes count only slots a live process
  holds now (``Registry.live_slots``).
- info and enum show the state set last, in any slot.

Label sets come in the order the collecting process made them (as
prometheus_client shows them), then the others sorted.  Tombstones (removed
series) are skipped; a slot whose stored definition differs in shape from
the one in use (a deploy changed the buckets) is left out of that metric.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import prometheus_client.metrics as _pc
from prometheus_client.metrics_core import Metric
from prometheus_client.utils import floatToGoString

from keepcount.metrics import label_key
from keepcount.registry import Registry
from keepcount.stores.base import FamilyDef
from keepcount.totals import host_snapshot

from .families import PromFamily
from .series import TOMBSTONE, _float, decode

__all__ = ["HostRead", "host_metrics"]

SLOT_LABEL = "pid"
"""The label of a gauge's per-slot series (modes ``all``/``liveall``), as
prometheus_client's multiprocess mode names it."""

_TYPES = {
    "counter": "counter", "gauge": "gauge", "summary": "summary", "histogram": "histogram",
    "info": "info", "stateset": "stateset",
}  # fmt: skip


@dataclass
class HostRead:
    """One read of a host's slots: definitions and live series per family."""

    definitions: dict[str, dict[str, FamilyDef]] = field(default_factory=dict)
    """name -> slot -> definition (``prometheus.*`` kinds only)."""
    rows: dict[str, dict[str, list[tuple[str, list[Any]]]]] = field(default_factory=dict)
    """name -> label key -> [(slot, decoded fields)], tombstones left out."""
    live: set[str] = field(default_factory=set)

    @classmethod
    def of(cls, keepcount: Registry) -> HostRead:
        # Liveness first: a slot serving by then has overwritten its dead
        # holder's rows (``slots.held_slots``), so the rows read next are its
        # own; read after them, a slot whose new holder began serving in
        # between would lend its liveness to the dead holder's rows.
        read = cls(live=keepcount.live_slots())
        snapshot = host_snapshot(keepcount._read_store(), keepcount.host)
        for slot, families in snapshot.families.items():
            for name, definition in families.items():
                if definition.kind.startswith("prometheus."):
                    read.definitions.setdefault(name, {})[slot] = definition
        for slot, name, key, raw in snapshot.rows:
            if raw == TOMBSTONE or slot not in read.definitions.get(name, {}):
                continue
            fields = decode(raw)
            if fields is not None:
                read.rows.setdefault(name, {}).setdefault(key, []).append((slot, fields))
        return read


def host_metrics(read: HostRead, collectors: dict[Any, Any]) -> Iterator[Metric]:
    """The registered collectors' metrics, in their order (this module's
    metrics combined from ``read``, any other collector as it collects),
    then the host's metrics no collector here declared, by name."""
    shown = set()
    for collector in collectors:
        family = getattr(collector, "_family", None)
        if isinstance(family, PromFamily):
            shown.add(family.name)
            yield _combine(read, collector._get_metric(), family.definition, collector)
        else:
            yield from collector.collect()
    for name in sorted(read.definitions.keys() - shown):
        slots = read.definitions[name]
        definition = slots[min(slots)]
        prom_type = _TYPES[definition.kind.split(".")[1]]
        metric = _combine(read, Metric(name, definition.help, prom_type), definition, None)
        if metric.samples:  # nothing but tombstones: as if never declared
            yield metric


def _combine(read: HostRead, metric: Metric, definition: FamilyDef, wrapper: Any) -> Metric:
    name = definition.name
    shaped = {
        slot for slot, d in read.definitions.get(name, {}).items() if d.same_shape(definition)
    }
    by_key = read.rows.get(name, {})
    order, functions = _local(wrapper)
    keys = [k for k in order if k in by_key or k in functions]
    keys += sorted(by_key.keys() - set(keys))
    kind = definition.kind.split(".")
    add = metric.add_sample
    for key in keys:
        labels = dict(zip(definition.labelnames, json.loads(key), strict=True))
        if key in functions:
            add(name, labels, float(functions[key]()))
            continue
        parts = [(slot, f) for slot, f in by_key.get(key, []) if slot in shaped]
        if kind[1] == "gauge" and kind[2].startswith("live"):
            parts = [(slot, f) for slot, f in parts if slot in read.live]
        if not parts:
            continue
        if kind[1] == "counter":
            add(name + "_total", labels, sum(_float(f[0]) for _, f in parts))
            _created(add, name, labels, parts, 1)
        elif kind[1] == "gauge":
            _gauge(add, name, labels, parts, kind[2].removeprefix("live"))
        elif kind[1] == "summary":
            add(name + "_count", labels, sum(_float(f[0]) for _, f in parts))
            add(name + "_sum", labels, sum(_float(f[1]) for _, f in parts))
            _created(add, name, labels, parts, 2)
        elif kind[1] == "histogram":
            _histogram(add, name, labels, parts, definition.buckets)
        else:
            _, latest = max(parts, key=lambda p: _float(p[1][1]))
            if kind[1] == "info":
                add(name + "_info", {**labels, **latest[0]}, 1.0)
            else:
                states = wrapper._states if wrapper is not None else latest[2]
                for state in states:
                    add(name, {**labels, name: state}, 1 if str(state) == latest[0] else 0)
    return metric


def _local(wrapper: Any) -> tuple[list[str], dict[str, Any]]:
    """The label keys the collecting process made, in order, and which of
    them take their value from a function (``Gauge.set_function``)."""
    if wrapper is None:
        return [], {}
    if not wrapper._labelnames:
        children = [((), wrapper)]
    else:
        with wrapper._lock:
            children = list(wrapper._metrics.items())
    order, functions = [], {}
    for values, child in children:
        key = label_key(tuple(values))
        order.append(key)
        if getattr(child, "_function", None) is not None:
            functions[key] = child._function
    return order, functions


def _created(add: Any, name: str, labels: dict[str, str], parts: list[Any], index: int) -> None:
    if _pc._use_created:
        add(name + "_created", labels, min(_float(f[index]) for _, f in parts))


def _gauge(add: Any, name: str, labels: dict[str, str], parts: list[Any], mode: str) -> None:
    if mode == "all":
        for slot, f in sorted(parts, key=lambda p: p[0]):
            add(name, {**labels, SLOT_LABEL: slot}, _float(f[0]))
        return
    values = [_float(f[0]) for _, f in parts]
    if mode == "sum":
        add(name, labels, sum(values, -0.0))  # -0.0 + x is x, even for x = -0.0
    elif mode == "min":
        add(name, labels, min(values))
    elif mode == "max":
        add(name, labels, max(values))
    else:  # mostrecent
        _, latest = max(parts, key=lambda p: _float(p[1][1]))
        add(name, labels, _float(latest[0]))


def _histogram(
    add: Any, name: str, labels: dict[str, str], parts: list[Any], bounds: tuple[float, ...]
) -> None:
    n = len(bounds)
    counts = [0.0] * n
    total = 0.0
    for _, f in parts:
        for i in range(n):
            counts[i] += _float(f[i])
        total += _float(f[n])
    acc = 0.0
    for bound, count in zip(bounds, counts, strict=True):
        acc += count
        add(name + "_bucket", {**labels, "le": floatToGoString(bound)}, acc)
    add(name + "_count", labels, acc)
    if bounds[0] >= 0:
        add(name + "_sum", labels, total)
    _created(add, name, labels, parts, n + 1)
