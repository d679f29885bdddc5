"""prometheus_client's API, durable: migrate by changing one import.

::

    from keepcount.prometheus import Counter, Histogram, make_asgi_app

    REQUESTS = Counter("app_requests_total", "Requests", ["route"])
    REQUESTS.labels(route="/").inc()

With ``KEEPCOUNT_STORE`` (a store URL) and ``KEEPCOUNT_NODE`` (this host's
id) set, or ``keepcount.prometheus.configure(store, node=...)`` called before
first use, the default ``REGISTRY`` keeps every value in the store: counters,
histograms, summaries, info and enum come back after kill -9, gauges follow
their ``multiprocess_mode`` across the host's workers, and ``/metrics`` is
the host's.  ``REGISTRY.commit_sync()`` (or ``await REGISTRY.commit()``) is
the durable barrier.  Without a store everything is prometheus_client's, in
memory.  See docs/prometheus.md for what differs and why.
"""

from __future__ import annotations

from prometheus_client.gc_collector import GCCollector
from prometheus_client.metrics import disable_created_metrics, enable_created_metrics
from prometheus_client.metrics_core import Metric
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from .exposition import (
    CONTENT_TYPE_LATEST,
    CONTENT_TYPE_PLAIN_0_0_4,
    MetricsHandler,
    generate_latest,
    make_asgi_app,
    make_wsgi_app,
    start_http_server,
    start_wsgi_server,
    write_to_textfile,
)
from .metrics import Counter, Enum, Gauge, Histogram, Info, Summary
from .registry import REGISTRY, CollectorRegistry, configure

PROCESS_COLLECTOR = ProcessCollector(registry=REGISTRY)
PLATFORM_COLLECTOR = PlatformCollector(registry=REGISTRY)
GC_COLLECTOR = GCCollector(registry=REGISTRY)

__all__ = [
    "CONTENT_TYPE_LATEST",
    "CONTENT_TYPE_PLAIN_0_0_4",
    "GC_COLLECTOR",
    "PLATFORM_COLLECTOR",
    "PROCESS_COLLECTOR",
    "REGISTRY",
    "CollectorRegistry",
    "Counter",
    "Enum",
    "GCCollector",
    "Gauge",
    "Histogram",
    "Info",
    "Metric",
    "MetricsHandler",
    "PlatformCollector",
    "ProcessCollector",
    "Summary",
    "configure",
    "disable_created_metrics",
    "enable_created_metrics",
    "generate_latest",
    "make_asgi_app",
    "make_wsgi_app",
    "start_http_server",
    "start_wsgi_server",
    "write_to_textfile",
]
