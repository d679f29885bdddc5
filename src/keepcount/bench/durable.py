"""``durable``: acknowledged increments per second, against Redis ``INCR``.

64 asyncio writers in one event loop each loop over ``child.inc(); await
reg.commit()``: an increment counts once its commit returned, i.e. once it
is on disk (SQLite WAL, ``synchronous=FULL``).  Group commit should let one
fsync acknowledge many writers, where Redis with ``appendfsync always``
pays a write and an fsync per event-loop pass (target: keepcount >= 3x
Redis).  The figures alternate, keepcount then Redis, for ``duration``
seconds each; every loop is also bounded in operations.  At the end the
stored total is checked against the acknowledged count: a figure only
counts if every acknowledged increment really is in the store.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import keepcount
from keepcount.bench import redis
from keepcount.bench.measure import interleave, latency_comparisons, median, percentile
from keepcount.bench.result import BenchError, BenchResult, Comparison, Report, Settings, Target
from keepcount.metrics import CounterChild

__all__ = ["LABEL_SETS", "TARGET", "WRITERS", "run"]

WRITERS = 64
LABEL_SETS = 8  # writers share children, as requests to one route do
TARGET = Target("ratio", ">=", 3.0)
_NAME = "bench_durable_total"
_GRACE = 30.0  # seconds a run may overrun its duration before it is abandoned


@dataclass(frozen=True, slots=True)
class _Run:
    ops: int
    seconds: float
    flushes: int
    p50_ms: float
    p99_ms: float

    @property
    def ops_per_s(self) -> float:
        return self.ops / self.seconds


def run(settings: Settings, report: Report) -> BenchResult:
    """Start Redis, open a registry in a temp dir, alternate the two, compare medians."""
    redis.require_tools()
    repeats = 2 if settings.quick else 3
    duration = settings.duration
    steps = 2 * repeats + 1
    result = BenchResult("durable", f"durable increments/s, {WRITERS} concurrent writers")
    with tempfile.TemporaryDirectory(prefix="durable-", dir=settings.workdir) as tmp:
        redis_dir = Path(tmp) / "redis"
        redis_dir.mkdir()
        report(0, steps, "durable: starting redis-server, opening the registry")
        reg = keepcount.open(f"sqlite:///{tmp}/durable.db", node="bench")
        try:
            with redis.RedisServer(redis_dir) as server:
                fam = reg.counter(_NAME, "durable benchmark", ["route", "status"])
                children = [fam.labels(f"/r{i // 2}", str(200 + i % 2)) for i in range(LABEL_SETS)]
                acked = _keepcount_run(reg, children, min(0.5, duration)).ops  # warm-up
                rate = server.benchmark(WRITERS, 2_000, _GRACE).ops_per_s
                ours: list[_Run] = []
                peer: list[redis.RedisRun] = []

                def ours_once() -> float:
                    report(2 * len(ours) + 1, steps, f"durable: keepcount {len(ours) + 1}")
                    ours.append(_keepcount_run(reg, children, duration))
                    return ours[-1].ops_per_s

                def peer_once() -> float:
                    nonlocal rate
                    report(2 * len(peer) + 2, steps, f"durable: redis {len(peer) + 1}")
                    requests = max(1_000, min(_max_ops(duration), int(rate * duration)))
                    peer.append(server.benchmark(WRITERS, requests, 10 * duration + _GRACE))
                    rate = peer[-1].ops_per_s
                    return rate

                a, b = interleave(ours_once, peer_once, repeats)
                acked += sum(r.ops for r in ours)
                stored = _stored(reg)
                if stored != acked:
                    raise BenchError(f"store holds {stored} increments, {acked} were acknowledged")
                version = redis.server_version()
        finally:
            reg.close()
    peer_name = f"Redis {version} INCR, appendfsync always"
    flushes = sum(r.flushes for r in ours)
    ops = sum(r.ops for r in ours)
    result.comparisons = [
        Comparison(
            "acknowledged increments/s",
            "ops/s",
            median(a),
            median(b),
            peer_name,
            TARGET,
            {"keepcount_runs": a, "redis_runs": b},
            f"{ops / flushes:.1f} increments per flush (fsync)" if flushes else "",
        ),
        *latency_comparisons(ours, peer, peer_name),
    ]
    result.notes = {
        "writers": WRITERS,
        "label_sets": LABEL_SETS,
        "duration_s": duration,
        "repeats": repeats,
        "flushes": flushes,
        "increments": ops,
        "increments_per_flush": ops / flushes if flushes else 0.0,
        "redis_requests": [r.requests for r in peer],
        "store": "SQLite WAL, synchronous=FULL",
    }
    return result


def _stored(reg: keepcount.Registry) -> int:
    """The durable total as read back from the store (not from memory)."""
    total = 0
    for series in reg.cluster(_NAME):
        assert isinstance(series.value, int)
        total += series.value
    return total


def _max_ops(duration: float) -> int:
    return max(1_000, int(duration * 1_000_000))


def _keepcount_run(reg: keepcount.Registry, children: list[CounterChild], duration: float) -> _Run:
    flushes = reg.flushes
    started = time.perf_counter()
    latencies = asyncio.run(_writers(reg, children, duration, _max_ops(duration)))
    seconds = time.perf_counter() - started
    if not latencies:
        raise BenchError("no increment was acknowledged")
    return _Run(
        len(latencies),
        seconds,
        reg.flushes - flushes,
        percentile(latencies, 50) * 1e3,
        percentile(latencies, 99) * 1e3,
    )


async def _writers(
    reg: keepcount.Registry, children: list[CounterChild], duration: float, max_ops: int
) -> list[float]:
    """Run the writers until ``duration`` passes or ``max_ops`` are acknowledged."""
    latencies: list[float] = []
    record = latencies.append
    clock = time.perf_counter
    deadline = clock() + duration

    async def writer(child: CounterChild) -> None:
        while len(latencies) < max_ops:
            started = clock()
            if started >= deadline:
                return
            child.inc()
            await reg.commit()
            record(clock() - started)

    tasks = [writer(children[i % len(children)]) for i in range(WRITERS)]
    await asyncio.wait_for(asyncio.gather(*tasks), duration + _GRACE)
    return latencies
