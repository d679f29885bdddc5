"""``/metrics``: a registry's values in Prometheus text 0.0.4 or OpenMetrics 1.0.

The text is written by prometheus_client's own encoders; keepcount only hands
them metric families through a custom collector (prometheus_client's
``Collector`` protocol: one ``collect()`` method).

Example::

    >>> import keepcount                                            # doctest: +SKIP
    >>> reg = keepcount.open("sqlite:///counters.db", node="node-1")  # doctest: +SKIP
    >>> body, content_type = render(reg, "application/openmetrics-text; version=1.0.0")  # doctest: +SKIP

What is exposed:

- **Durable values only**: each series as of the last successful flush
  (``MetricFamily.series``), not an increment still in memory, which a
  kill -9 would take back — so a scraped value never goes backwards across
  a restart (DESIGN G3).  A node answering HTTP increments flushes before
  it answers, so it lags by at most the increments in flight.
- **Durable families**, as declared: a counter's samples are named
  ``<base>_total`` and ``<base>_created`` where ``<base>`` is its name without
  a trailing ``_total`` (so ``http_requests_total`` is exposed as
  ``http_requests_total``, never ``..._total_total``, and a counter named
  ``jobs`` as ``jobs_total``: both formats require the suffix).  A histogram
  ``h`` gives cumulative ``h_bucket{le=...}`` samples (``le`` written like
  prometheus_client writes it: ``0.005``, ``1.0``, ``+Inf``), ``h_count``,
  ``h_sum`` and ``h_created``; like prometheus_client, a histogram whose
  first bucket bound is negative has no ``_sum`` / ``_count`` (the formats
  forbid them).  Every series the node holds is exposed, also restored ones
  no code has touched since the restart.  ``_created`` is the series' first
  write, kept by the store: the same before and after a restart, so
  Prometheus sees one continuous series, never a reset.  Families of other
  kinds than ``counter`` and ``histogram`` (``prometheus.*``) are not
  exposed here.
- **A HELP line for every family**: a family declared without a help text
  (``help=""``, or restored from a store that kept none) is exposed with
  ``missing_help(kind)``, since Prometheus' linter (``promtool check
  metrics``) flags a family without one.
- **Node gauges** (``keepcount_*``, after the durable families, off with
  ``node_metrics=False``): facts about *this process*, not stored and not
  summed over nodes.  They are gauges, not counters, because keepcount's
  counters promise never to go backwards across a restart and these do
  start again: ``keepcount_process_flushes`` counts the store writes of this
  process only and is 0 after each restart.  The node id is the gauge
  ``keepcount_node_info{node="..."} 1`` in both formats (the usual
  ``*_info`` gauge), not an OpenMetrics ``info`` family: parsers of the
  Prometheus text format, ``promtool check metrics`` among them, refuse an
  exposition that holds the type ``info``.

Invariants:

- Families are exposed in name order and series in label-value order, so
  two scrapes of the same values give the same bytes, across restarts too.
- No two exposed families claim the same sample name (the formats forbid it,
  and prometheus_client's parsers reject it).  If two families would (a
  counter ``foo`` and a counter ``foo_total``; a histogram ``foo`` and a
  counter ``foo_total``), the first in name order is exposed and the other
  skipped with a logged warning.  A user family always wins over a node
  gauge of the same name: the gauge is skipped.
- Values are floats on the wire: counter values above 2**53 lose precision
  there (Prometheus stores float64), never in the store.
- Metric and label names are exposed unchanged for every escaping scheme a
  scraper may ask for except ``escaping=dots``, which by definition doubles
  every ``_`` (and which the scraper undoes).
"""

from __future__ import annotations

import functools
import logging
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.openmetrics import exposition as openmetrics
from prometheus_client.registry import Collector, CollectorRegistry
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

from keepcount.metrics import HistogramValue, MetricFamily
from keepcount.registry import Registry
from keepcount.stores.base import is_native_kind

__all__ = [
    "NODE_METRIC_NAMES",
    "KeepcountCollector",
    "collector_registry",
    "exposed_names",
    "missing_help",
    "render",
]

log = logging.getLogger(__name__)

NODE_METRIC_NAMES: tuple[str, ...] = (
    "keepcount_node_info",  # a gauge: keepcount_node_info{node="..."} 1
    "keepcount_epoch",
    "keepcount_restored_series",
    "keepcount_restore_seconds",
    "keepcount_process_flushes",
    "keepcount_fenced",
    "keepcount_series",
)
"""Family names of the node gauges; a user family of a clashing name wins."""


def missing_help(kind: str) -> str:
    """The HELP text exposed for a family of ``kind`` declared without one."""
    return f"A keepcount {kind} declared without a help text."


def exposed_names(kind: str, name: str) -> frozenset[str]:
    """Every name a family of ``kind`` called ``name`` claims in either format.

    Family names and sample names alike (as prometheus_client's registry
    counts them for its duplicate check): two families that share one would
    produce an exposition the parsers reject.
    """
    if kind == "counter":
        base = name.removesuffix("_total")
        return frozenset((base, base + "_total", base + "_created"))
    if kind == "histogram":
        suffixes = ("", "_bucket", "_count", "_sum", "_created")
        return frozenset(name + s for s in suffixes)
    if kind == "info":
        return frozenset((name, name + "_info"))
    return frozenset((name,))


class _HistogramFamily(HistogramMetricFamily):
    """``HistogramMetricFamily`` with the ``_created`` sample its ``add_metric`` lacks.

    prometheus_client's own ``Histogram`` writes ``_created`` after
    ``_count`` / ``_sum``; this does the same.
    """

    def add_histogram(
        self,
        labels: tuple[str, ...],
        bounds: Iterable[str],
        value: HistogramValue,
        created: float | None,
    ) -> None:
        buckets = list(zip(bounds, value.cumulative(), strict=True))
        self.add_metric(labels, buckets, value.sum)
        if created is not None:
            labeldict = dict(zip(self._labelnames, labels, strict=True))
            self.samples.append(Sample(self.name + "_created", labeldict, created))


CREATED_WAIT = 60.0
"""Seconds a scrape waits for restored created times (a million series load
in about a second)."""


class KeepcountCollector:
    """A prometheus_client collector over a keepcount ``Registry``.

    Example::

        >>> from prometheus_client import CollectorRegistry, generate_latest  # doctest: +SKIP
        >>> cr = CollectorRegistry(auto_describe=False)                     # doctest: +SKIP
        >>> cr.register(KeepcountCollector(reg))                            # doctest: +SKIP
        >>> generate_latest(cr)                                             # doctest: +SKIP

    It has no ``describe()``: its families change as code declares them, so
    prometheus_client's registry must not check names at registration (use
    ``CollectorRegistry(auto_describe=False)``).  ``collect()`` reads the
    registry's memory only (no store I/O) and is safe from any thread; each
    family is read under the registry lock, one family at a time.  It keeps
    the registry alive unless built by ``collector_registry()``, whose cached
    copy holds it weakly (and exposes nothing once it is gone).
    """

    def __init__(self, registry: Registry, *, node_metrics: bool = True) -> None:
        self._strong: Registry | None = registry
        self._ref = weakref.ref(registry)
        self.node_metrics = node_metrics
        self._warned: set[str] = set()

    @classmethod
    def _weak(cls, registry: Registry, *, node_metrics: bool) -> KeepcountCollector:
        collector = cls(registry, node_metrics=node_metrics)
        collector._strong = None
        return collector

    def collect(self) -> Iterator[Metric]:
        registry = self._ref()
        if registry is None:
            return
        # Restored series' created times load in the background after open();
        # a scrape right after a restart waits for them rather than expose a
        # series without its _created (it would look like a new series).
        registry.wait_created(CREATED_WAIT)
        claimed: set[str] = set()
        families = sorted(registry.families(), key=lambda f: f.name)
        for family in families:
            if not is_native_kind(family.kind):
                continue
            names = exposed_names(family.kind, family.name)
            if self._clashes(family.name, names, claimed):
                continue
            claimed |= names
            if family.kind == "counter":
                yield _counter(family)
            else:
                yield _histogram(family)
        if self.node_metrics:
            for metric in _node_metrics(registry, families):
                names = exposed_names(metric.type, metric.name)
                if not self._clashes(metric.name, names, claimed):
                    claimed |= names
                    yield metric

    def _clashes(self, name: str, names: frozenset[str], claimed: set[str]) -> bool:
        overlap = names & claimed
        if not overlap:
            return False
        if name not in self._warned:  # once per name, not once per scrape
            self._warned.add(name)
            log.warning(
                "/metrics: not exposing %s: its sample names %s are taken by another family",
                name,
                sorted(overlap),
            )
        return True

    def __repr__(self) -> str:
        return f"<KeepcountCollector of {self._ref()!r}>"


def _counter(family: MetricFamily[Any]) -> CounterMetricFamily:
    # CounterMetricFamily drops a trailing "_total" from the family name and
    # adds it back to the sample: "x_total" is exposed as "x_total".
    help_ = family.help or missing_help("counter")
    metric = CounterMetricFamily(family.name, help_, labels=family.labelnames)
    for labels, value, created in sorted(family.series(), key=_by_labels):
        metric.add_metric(labels, value, created=created)
    return metric


def _histogram(family: MetricFamily[Any]) -> _HistogramFamily:
    help_ = family.help or missing_help("histogram")
    metric = _HistogramFamily(family.name, help_, labels=family.labelnames)
    # "le" exactly as prometheus_client's own Histogram writes it.
    bounds = [floatToGoString(b) for b in family.definition.buckets]  # type: ignore[no-untyped-call]
    for labels, value, created in sorted(family.series(), key=_by_labels):
        metric.add_histogram(labels, bounds, value, created)
    return metric


def _by_labels(series: tuple[tuple[str, ...], Any, float | None]) -> tuple[str, ...]:
    return series[0]


def _node_metrics(registry: Registry, families: list[MetricFamily[Any]]) -> Iterator[Metric]:
    note = " Process-local: not stored, not summed over nodes."
    node = GaugeMetricFamily(
        "keepcount_node_info",
        "The keepcount node id this process serves (always 1)." + note,
        labels=["node"],
    )
    node.add_metric([registry.node], 1)
    yield node
    yield GaugeMetricFamily(
        "keepcount_epoch",
        "Claim epoch of this incarnation of the node id; higher after every restart." + note,
        registry.epoch,
    )
    yield GaugeMetricFamily(
        "keepcount_restored_series",
        "Series loaded from the store when this process opened the registry." + note,
        registry.restored_series,
    )
    yield GaugeMetricFamily(
        "keepcount_restore_seconds",
        "Time this process took to claim the node id and load its series." + note,
        registry.restore_seconds,
        unit="seconds",
    )
    yield GaugeMetricFamily(
        "keepcount_process_flushes",
        "Successful store writes by this process; starts at 0 on every restart "
        "(a gauge, since keepcount counters never reset)." + note,
        registry.flushes,
    )
    yield GaugeMetricFamily(
        "keepcount_fenced",
        "1 once a newer incarnation took the node id (nothing more is acknowledged), else 0."
        + note,
        1 if registry.fenced else 0,
    )
    yield GaugeMetricFamily(
        "keepcount_series",
        "Label sets held in memory now, restored ones included, over all families." + note,
        sum(len(f) for f in families),
    )


_cache_lock = threading.Lock()
_cache: weakref.WeakKeyDictionary[Registry, dict[bool, CollectorRegistry]] = (
    weakref.WeakKeyDictionary()
)


def collector_registry(registry: Registry, *, node_metrics: bool = True) -> CollectorRegistry:
    """The prometheus_client ``CollectorRegistry`` exposing ``registry`` (cached).

    Built once per keepcount registry (and ``node_metrics`` choice) and
    reused by every scrape; never prometheus_client's global ``REGISTRY``.
    The cache holds the keepcount registry weakly.  Hand it to any
    prometheus_client exposition helper (``make_asgi_app(registry=...)``).
    """
    with _cache_lock:
        per_registry = _cache.setdefault(registry, {})
        cr = per_registry.get(node_metrics)
        if cr is None:
            cr = CollectorRegistry(auto_describe=False)
            cr.register(KeepcountCollector._weak(registry, node_metrics=node_metrics))
            per_registry[node_metrics] = cr
        return cr


def render(
    registry: Registry, accept: str | None = None, *, node_metrics: bool = True
) -> tuple[bytes, str]:
    """The ``/metrics`` body and its ``Content-Type`` for an ``Accept`` header.

    OpenMetrics 1.0 when ``accept`` names ``application/openmetrics-text``
    (without a version or with one >= 1.0.0), Prometheus text 0.0.4
    otherwise (also for no header); prometheus_client's ``choose_encoder``
    decides, including its handling of ``escaping=`` and ``text/plain;
    version=1.0.0``.  Reads memory only: cheap enough for the event loop at
    ordinary sizes; run it in a thread for very many series.
    """
    encoder, content_type = _choose_encoder(accept)
    return encoder(collector_registry(registry, node_metrics=node_metrics)), content_type


def _choose_encoder(accept: str | None) -> tuple[Callable[[Collector], bytes], str]:
    encoder, content_type = choose_encoder(accept or "")
    # prometheus_client (0.26, issue #1177) writes OpenMetrics *sample* names
    # with the label-name character set when escaping is "underscores" (the
    # default) or "values", so "job:hits_total" comes out as "job_hits_total"
    # under "# TYPE job:hits counter".  Every name keepcount exposes is a
    # valid legacy name (keepcount.naming), which those schemes leave as it
    # is; for such names "allow-utf-8" writes exactly those bytes.  The
    # Content-Type (which names the negotiated scheme) stays as negotiated.
    if (
        isinstance(encoder, functools.partial)
        and encoder.func is openmetrics.generate_latest
        and encoder.keywords.get("escaping") in (openmetrics.UNDERSCORES, openmetrics.VALUES)
    ):
        keywords = {**encoder.keywords, "escaping": openmetrics.ALLOWUTF8}
        encoder = functools.partial(encoder.func, *encoder.args, **keywords)
    return encoder, content_type
