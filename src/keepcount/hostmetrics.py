"""``/metrics`` for a host: every slot of it summed, from durable values.

A host of N workers (``keepcount.slots``) is scraped on one port, and the
scrape lands on whichever worker the server picks.  So a worker does not
expose its own memory: it reads the host's rows from the store and sums each
series over the host's slots, dead ones included.  Every worker answers with
the same numbers, and a total never goes backwards when a worker dies or
recycles (a slot's stored values only grow; a dead slot's stay).

Mount it in the app like prometheus_client's helpers::

    from keepcount.wsgi import make_wsgi_app     # Flask, Django, any WSGI app
    from keepcount.asgi import make_asgi_app     # Starlette, FastAPI, any ASGI app

What is exposed: each family of a native kind with its HELP
(``missing_help`` where it has none), counters as ``<base>_total`` and
histograms as ``_bucket`` / ``_count`` / ``_sum``, as
``keepcount.exposition`` names them (families of other kinds are left out); no
``_created`` (a host's series has one per slot); and the gauge
``keepcount_host_slots``: how many slots the host has in the store.  With
``per_worker=True`` every series is split by the label ``keepcount_slot``
(``web-1``, ``web-1@1``, ...) instead of summed.

Cost: one read of the host's rows per scrape (``totals.host_snapshot``:
each slot's rows, nothing of other hosts on the same store).  Scrapes in one process are
served one read at a time, and a scrape that waited for a read which began
after it arrived takes that read's answer: it holds everything acknowledged
before the scrape arrived, so a scraper never sees a total lower than one it
saw before, whichever workers answered.  (A cache kept for a while would
break that: two workers' caches of different ages, scraped in turn, would
go backwards.)
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
)
from prometheus_client.registry import CollectorRegistry
from prometheus_client.utils import floatToGoString

from keepcount.exposition import _choose_encoder, _HistogramFamily, missing_help
from keepcount.metrics import HistogramValue
from keepcount.registry import Registry
from keepcount.stores.base import FamilyDef, is_native_kind
from keepcount.totals import SeriesTotal, cluster_totals, host_snapshot

__all__ = ["SLOT_LABEL", "HostView"]

SLOT_LABEL = "keepcount_slot"
"""The label of the per-worker breakdown (``per_worker=True``)."""


@dataclass(frozen=True, slots=True)
class _Read:
    started: float
    totals: list[SeriesTotal]
    definitions: dict[str, FamilyDef]
    slots: int


class HostView:
    """The host's totals of one registry, read from the store per scrape.

    ``render(accept)`` returns the body and ``Content-Type`` (Prometheus
    text or OpenMetrics, negotiated like ``keepcount.exposition.render``).
    It reads the store: call it from a thread in asyncio code.  Raises
    ``StoreUnavailable`` when the store cannot be read.
    """

    def __init__(self, registry: Registry, *, per_worker: bool = False) -> None:
        self.registry = registry
        self.per_worker = per_worker
        self._lock = threading.Lock()
        self._last: _Read | None = None
        self._collectors = CollectorRegistry(auto_describe=False)
        self._collectors.register(_Collector(self))

    def read(self) -> _Read:
        arrived = time.monotonic()
        with self._lock:
            last = self._last
            if last is not None and last.started >= arrived:
                return last  # began after this scrape arrived: as fresh as its own
            started = time.monotonic()
            registry = self.registry
            snapshot = host_snapshot(registry._read_store(), registry.host)
            definitions: dict[str, FamilyDef] = {}
            for node in sorted(snapshot.families):
                for name, definition in snapshot.families[node].items():
                    if not is_native_kind(definition.kind):
                        continue
                    definitions.setdefault(name, definition)
                    if definition.help and not definitions[name].help:
                        definitions[name] = definition
            slots = len(snapshot.families)
            self._last = _Read(started, cluster_totals(snapshot), definitions, slots)
            return self._last

    def render(self, accept: str | None = None) -> tuple[bytes, str]:
        encoder, content_type = _choose_encoder(accept)
        return encoder(self._collectors), content_type


class _Collector:
    def __init__(self, view: HostView) -> None:
        self.view = view

    def collect(self) -> Iterator[Metric]:
        read = self.view.read()
        per_worker = self.view.per_worker
        families: dict[tuple[str, str, tuple[float, ...]], Metric] = {}
        for total in read.totals:
            definition = read.definitions.get(total.name)
            if definition is None or definition.kind != total.kind:
                continue
            group = (total.name, total.kind, total.buckets)
            metric = families.get(group)
            if metric is None:
                if any(g[0] == total.name for g in families):
                    continue  # slots disagree on its shape: expose the first only
                labelnames = [*definition.labelnames] + ([SLOT_LABEL] if per_worker else [])
                help_ = definition.help or missing_help(total.kind)
                metric = (
                    CounterMetricFamily(total.name, help_, labels=labelnames)
                    if total.kind == "counter"
                    else _HistogramFamily(total.name, help_, labels=labelnames)
                )
                families[group] = metric
            labels = [total.labels[n] for n in definition.labelnames]
            parts = sorted(total.nodes.items()) if per_worker else [("", total.value)]
            bounds = [floatToGoString(b) for b in total.buckets]  # type: ignore[no-untyped-call]  # () for a counter
            for slot, value in parts:
                values = tuple([*labels, slot] if per_worker else labels)
                if isinstance(metric, _HistogramFamily):
                    assert isinstance(value, HistogramValue)
                    metric.add_histogram(values, bounds, value, None)
                else:
                    assert isinstance(metric, CounterMetricFamily) and isinstance(value, int)
                    metric.add_metric(values, value)
        yield from (families[g] for g in sorted(families))
        yield GaugeMetricFamily(
            "keepcount_host_slots",
            "Slots (worker processes ever alive at once) the host has in the store.",
            read.slots,
        )
