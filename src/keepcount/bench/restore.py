"""``restore``: how long a node takes to come back with N counters.

Restart time is the window in which a node's counters are unavailable, so it
must stay short even for a million series (target: under 2 s).  The peer is
the least any restore can do: one plain ``SELECT labels, value FROM series``
into a dict through ``sqlite3``.  The ratio is keepcount's overhead on top of
reading the rows (claim, checks, per-family grouping, the store's open-time
``quick_check``).
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

import keepcount
from keepcount.bench import dataset
from keepcount.bench.measure import interleave, median, progress
from keepcount.bench.result import BenchError, BenchResult, Comparison, Report, Settings, Target

__all__ = ["TARGET_1M", "run", "sizes"]

TARGET_1M = Target("ours", "<", 2.0, "s")


def sizes(quick: bool) -> tuple[int, ...]:
    return (1_000, 10_000) if quick else (10_000, 100_000, 1_000_000)


def run(settings: Settings, report: Report) -> BenchResult:
    """Per size: build the store once, then time open+close against a bare read."""
    result = BenchResult("restore", "restore: open (claim + restore) + close, vs a bare read")
    todo = sizes(settings.quick)
    steps = sum(1 + _repeats(n, settings.quick) for n in todo)
    done = 0
    for n in todo:
        report(done, steps, f"restore: building a store of {n:,} counters")
        path = dataset.ensure(settings.workdir, n)
        done += 1
        repeats = _repeats(n, settings.quick)
        on_repeat = progress(report, done, steps, f"restore: {n:,} counters", repeats)
        result.comparisons.append(_compare(path, n, repeats, on_repeat))
        done += repeats
    result.notes = {
        "layout": f"{dataset.FAMILIES} families x 2 labels, one node",
        "keepcount": "keepcount.open(url, node, max_children=None) then close()",
        "restore_seconds": "Registry.restore_seconds: claim + load, after the store is open",
        "store_open_s": "open - restore_seconds: opening and checking the file",
    }
    return result


def _compare(path: Path, n: int, repeats: int, on_repeat: Callable[[int], None]) -> Comparison:
    restore_seconds: list[float] = []
    open_seconds: list[float] = []

    def ours() -> float:
        started = time.perf_counter()
        reg = keepcount.open(f"sqlite:///{path}", node=dataset.NODE, max_children=None)
        opened = time.perf_counter()
        reg.close()
        finished = time.perf_counter()
        if reg.restored_series != n:
            raise BenchError(f"restored {reg.restored_series} series, expected {n}")
        restore_seconds.append(reg.restore_seconds)
        open_seconds.append(opened - started)
        return finished - started

    def peer() -> float:
        started = time.perf_counter()
        conn = sqlite3.connect(path)
        try:
            values = dict(conn.execute("SELECT labels, value FROM series"))
        finally:
            conn.close()
        elapsed = time.perf_counter() - started
        if len(values) != n:
            raise BenchError(f"read {len(values)} series, expected {n}")
        return elapsed

    a, b = interleave(ours, peer, repeats, on_repeat)
    store_open = [o - r for o, r in zip(open_seconds, restore_seconds, strict=True)]
    note = (
        f"restore_seconds {median(restore_seconds):.3f} s, "
        f"store open+check {median(store_open):.3f} s"
    )
    return Comparison(
        f"{n:,} counters",
        "s",
        median(a),
        median(b),
        "sqlite3 SELECT into a dict",
        TARGET_1M if n == 1_000_000 else None,
        {
            "counters": n,
            "open_s": median(open_seconds),
            "restore_seconds": median(restore_seconds),
            "store_open_s": median(store_open),
            "repeats": repeats,
            "store_mb": path.stat().st_size / 1e6,
        },
        note,
    )


def _repeats(n: int, quick: bool) -> int:
    if quick:
        return 2
    return 3 if n >= 1_000_000 else 5
