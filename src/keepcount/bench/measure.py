"""Interleaved repetitions and the statistics reported from them.

On a shared 2-core machine the speed of a loop swings 2-3x with CPU
placement and neighbours.  Running ours and the peer alternately
(A, B, A, B, ...) exposes both to the same swings, and medians ignore the
odd repetition a neighbour spoiled.
"""

from __future__ import annotations

import math
import statistics
import time
import timeit
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from keepcount.bench.result import Comparison, Report

__all__ = [
    "interleave",
    "median",
    "percentile",
    "probe_writes",
    "progress",
    "timeit_loops",
    "timeit_sampler",
]


def interleave(
    ours: Callable[[], float],
    peer: Callable[[], float],
    repeats: int,
    on_repeat: Callable[[int], None] | None = None,
) -> tuple[list[float], list[float]]:
    """Call ``ours`` then ``peer``, ``repeats`` times; return both lists of figures."""
    a: list[float] = []
    b: list[float] = []
    for i in range(repeats):
        a.append(ours())
        b.append(peer())
        if on_repeat is not None:
            on_repeat(i + 1)
    return a, b


def progress(
    report: Report, offset: int, total: int, text: str, repeats: int
) -> Callable[[int], None]:
    """An ``on_repeat`` for ``interleave`` that reports steps ``offset + i`` of ``total``."""

    def on_repeat(i: int) -> None:
        report(offset + i, total, f"{text} {i}/{repeats}")

    return on_repeat


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def percentile(values: Sequence[float], p: float) -> float:
    """The nearest-rank percentile: a value that was really observed."""
    if not values:
        raise ValueError("no values")
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return float(ordered[rank - 1])


def timeit_sampler(timer: timeit.Timer, number: int) -> Callable[[], float]:
    """One repetition: ``number`` loops, returned as nanoseconds per loop."""

    def sample() -> float:
        return timer.timeit(number) / number * 1e9

    return sample


def timeit_loops(timer: timeit.Timer, seconds: float) -> int:
    """Loops per repetition so one repetition takes about ``seconds``."""
    probe = 2000
    per_op = max(timer.timeit(probe) / probe, 1e-9)
    return max(1000, min(5_000_000, int(seconds / per_op)))


class _Run(Protocol):
    @property
    def p50_ms(self) -> float: ...
    @property
    def p99_ms(self) -> float: ...


def latency_comparisons(
    ours: Sequence[_Run], peer: Sequence[_Run], peer_name: str
) -> list[Comparison]:
    """``latency p50`` and ``latency p99``: the medians over the runs of each side."""
    return [
        Comparison(
            f"latency {q}",
            "ms",
            median([getattr(r, f"{q}_ms") for r in ours]),
            median([getattr(r, f"{q}_ms") for r in peer]),
            peer_name,
        )
        for q in ("p50", "p99")
    ]


Probe = Callable[[float, tuple[Any, ...], dict[str, Any]], None]


def probe_writes(store: Any, record: Probe) -> None:
    """Time every ``store.write`` from now on (the flusher's store calls):
    ``record(seconds, args, kwargs)`` after each, failed ones too."""
    write = store.write

    def timed(*args: Any, **kwargs: Any) -> None:
        started = time.perf_counter()
        try:
            write(*args, **kwargs)
        finally:
            record(time.perf_counter() - started, args, kwargs)

    store.write = timed
