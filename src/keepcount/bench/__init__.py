"""The benchmarks of DESIGN §9, each a ratio against a peer measured in the same run.

One module per benchmark, each with ``run(settings, report) -> BenchResult``:

- ``inc``: in-memory increment vs prometheus_client;
- ``durable``: acknowledged increments/s vs Redis ``INCR`` with ``appendfsync always``;
- ``restore``: open + close with 10k..1M counters vs a bare SQLite read;
- ``flush``: commit of 10 dirty counters among 1M vs among 10;
- ``http``: durable HTTP increments/s vs a no-op endpoint of the same node;
- ``failover``: a SIGKILLed node of a live cluster: LB, restart, errors, throughput;
- ``cassandra``: the Cassandra store vs Cassandra counter columns; restore of 100k.

``cassandra_scale`` (``keepcount bench cassandra-scale``, not part of ``all``:
it writes a million series) measures the Cassandra store at scale (issue 17):
restore of up to 1M series, flush, HTTP increments, kill -> ready and cluster
totals, each vs a bare driver call or the node's own flush.

Example::

    >>> from pathlib import Path                                    # doctest: +SKIP
    >>> result = BENCHMARKS["inc"](Settings(Path("/tmp")), lambda *a: None)  # doctest: +SKIP
    >>> result.comparisons[0].ratio                                 # doctest: +SKIP
    0.7
"""

from __future__ import annotations

from collections.abc import Callable

from keepcount.bench import cassandra, durable, failover, flush, http, inc, restore
from keepcount.bench.result import (
    BenchError,
    BenchResult,
    Comparison,
    Report,
    Settings,
    Target,
)

__all__ = [
    "BENCHMARKS",
    "BenchError",
    "BenchResult",
    "Comparison",
    "Report",
    "Settings",
    "Target",
]

BENCHMARKS: dict[str, Callable[[Settings, Report], BenchResult]] = {
    "inc": inc.run,
    "durable": durable.run,
    "restore": restore.run,
    "flush": flush.run,
    "http": http.run,
    "failover": failover.run,
    "cassandra": cassandra.run,
}
"""In the order ``all`` runs them: ``flush`` reuses the store ``restore`` built."""
