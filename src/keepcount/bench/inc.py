"""``inc``: the in-memory cost of an increment, against prometheus_client.

keepcount's ``inc()`` takes a lock and marks the child dirty for the next
flush; prometheus_client's takes a lock and adds.  Both should cost the same
(target: ratio <= 1.0).  ``labels(...)`` is where keepcount is meant to win
(target <= 0.5): it caches children by the raw tuple of values given, while
prometheus_client normalises and validates them on every call.
"""

from __future__ import annotations

import tempfile
import timeit
from dataclasses import dataclass
from importlib.metadata import version
from typing import Any

import prometheus_client

import keepcount
from keepcount.bench.measure import interleave, median, progress, timeit_loops, timeit_sampler
from keepcount.bench.result import BenchResult, Comparison, Report, Settings, Target

__all__ = ["run"]

_PEER = f"prometheus_client {version('prometheus_client')}"


@dataclass(frozen=True, slots=True)
class _Case:
    measure: str
    stmt: str
    target: Target


_CASES = (
    _Case("child.inc()", "child.inc()", Target("ratio", "<=", 1.0)),
    _Case("labels(a, b).inc()", "fam.labels('GET', '200').inc()", Target("ratio", "<=", 0.5)),
    _Case(
        "labels(a=.., b=..).inc()",
        "fam.labels(method='GET', status='200').inc()",
        Target("ratio", "<=", 0.5),
    ),
)


def run(settings: Settings, report: Report) -> BenchResult:
    """Time each case with ``timeit``, ours and prometheus_client's interleaved."""
    repeats = 3 if settings.quick else 11
    seconds_per_repeat = 0.02 if settings.quick else 0.2
    result = BenchResult("inc", "inc(): in-memory increment, vs prometheus_client")
    with tempfile.TemporaryDirectory(prefix="inc-", dir=settings.workdir) as tmp:
        reg = keepcount.open(f"sqlite:///{tmp}/bench.db", node="bench", flush_interval=None)
        try:
            fam = reg.counter("bench_inc_total", "inc() benchmark", ["method", "status"])
            peer_fam = prometheus_client.Counter(
                "bench_inc",
                "inc() benchmark",
                ["method", "status"],
                registry=prometheus_client.CollectorRegistry(),
            )
            ours_ns: dict[str, Any] = {"fam": fam, "child": fam.labels("GET", "200")}
            peer_ns: dict[str, Any] = {"fam": peer_fam, "child": peer_fam.labels("GET", "200")}
            total = len(_CASES) * repeats
            for n, case in enumerate(_CASES):
                ours = timeit.Timer(case.stmt, globals=ours_ns)
                peer = timeit.Timer(case.stmt, globals=peer_ns)
                number = timeit_loops(peer, seconds_per_repeat)

                a, b = interleave(
                    timeit_sampler(ours, number),
                    timeit_sampler(peer, number),
                    repeats,
                    progress(report, n * repeats, total, f"inc: {case.measure}", repeats),
                )
                result.comparisons.append(
                    Comparison(
                        case.measure,
                        "ns/op",
                        median(a),
                        median(b),
                        _PEER,
                        case.target,
                        {"loops_per_repeat": number, "repeats": repeats},
                    )
                )
        finally:
            reg.close()
    result.notes = {"timer": "timeit, gc disabled; median of interleaved repeats"}
    return result
