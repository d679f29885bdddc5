"""``flush``: one commit's cost depends on what is dirty, not on what exists.

A flush writes only the children incremented since the last one (DESIGN §4),
so committing 10 dirty counters should cost the same in a registry holding a
million as in one holding ten.  Each iteration increments 10 different
children of each registry and times ``commit_sync()`` (one SQLite
transaction with ``synchronous=FULL``: its fsync dominates).  Target: the
median under 1 ms with a million counters; the ratio against the 10-counter
registry shows how much the size of the table adds (B-tree depth, cache).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import keepcount
from keepcount.bench import dataset
from keepcount.bench.measure import interleave, median, percentile, progress
from keepcount.bench.result import BenchResult, Comparison, Report, Settings, Target
from keepcount.metrics import CounterChild

__all__ = ["DIRTY", "TARGET", "run"]

DIRTY = 10
TARGET = Target("ours", "<", 1.0, "ms")
_POOL = 2_000  # children cycled through, so each iteration dirties new rows
_COMMIT_TIMEOUT = 30.0


def run(settings: Settings, report: Report) -> BenchResult:
    """Open both registries, then alternate: 10 incs + commit in each."""
    big_n = 10_000 if settings.quick else 1_000_000
    iterations = 30 if settings.quick else 200
    result = BenchResult("flush", f"flush: commit_sync() of {DIRTY} dirty counters")
    report(0, iterations, f"flush: preparing a store of {big_n:,} counters")
    big_path = dataset.ensure(settings.workdir, big_n)
    small_path = dataset.ensure(settings.workdir, DIRTY)
    big = keepcount.open(
        f"sqlite:///{big_path}", node=dataset.NODE, flush_interval=None, max_children=None
    )
    try:
        small = keepcount.open(f"sqlite:///{small_path}", node=dataset.NODE, flush_interval=None)
        try:
            ours = _committer(big, min(_POOL, big_n))
            peer = _committer(small, DIRTY)
            for _ in range(5):  # warm the statement cache and the WAL
                ours()
                peer()
            on_repeat = progress(report, 0, iterations, "flush: commits", iterations)
            a, b = interleave(ours, peer, iterations, on_repeat)
            flushes = {"keepcount_flushes": big.flushes, "peer_flushes": small.flushes}
        finally:
            small.close()
    finally:
        big.close()
    result.comparisons.append(
        Comparison(
            f"median, {big_n:,} counters",
            "ms",
            median(a),
            median(b),
            f"registry of {DIRTY} counters",
            TARGET,
            {"mean_ms": sum(a) / len(a), "peer_mean_ms": sum(b) / len(b)},
            f"{iterations} commits each",
        )
    )
    result.comparisons.append(
        Comparison(
            f"p99, {big_n:,} counters",
            "ms",
            percentile(a, 99),
            percentile(b, 99),
            f"registry of {DIRTY} counters",
            None,
            {"max_ms": max(a), "peer_max_ms": max(b)},
            f"max {max(a):.2f} ms vs {max(b):.2f} ms",
        )
    )
    result.notes = {"iterations": iterations, "dirty_per_commit": DIRTY, **flushes}
    return result


def _committer(reg: keepcount.Registry, pool: int) -> Callable[[], float]:
    """Each call: ``inc()`` the next ``DIRTY`` children, then time ``commit_sync()`` in ms."""
    families = [
        reg.counter(dataset.family_name(i), dataset.HELP, dataset.LABELNAMES)
        for i in range(dataset.FAMILIES)
    ]
    children: list[CounterChild] = [
        families[j % dataset.FAMILIES].labels(*dataset.labels_of(j)) for j in range(pool)
    ]
    reg.commit_sync(_COMMIT_TIMEOUT)  # families declared above: not part of any timing
    position = 0

    def commit() -> float:
        nonlocal position
        for _ in range(DIRTY):
            children[position].inc()
            position = (position + 1) % pool
        started = time.perf_counter()
        reg.commit_sync(_COMMIT_TIMEOUT)
        return (time.perf_counter() - started) * 1e3

    return commit
