"""``cassandra``: the Cassandra store against Cassandra's own counter columns.

On a local Apache Cassandra cluster (3 nodes, RF=3; 1 node with ``--quick``)
started for the run:

- **durable increments/s**, 64 asyncio writers over 8 label sets, each
  looping ``child.inc(); await reg.commit()`` through the Cassandra store
  (an increment counts once its flush — one single-partition batch at
  QUORUM — returned), against the same 64 writers each awaiting
  ``UPDATE ... SET v = v + 1`` at QUORUM on a counter column, the approach
  DESIGN §5 replaces (a timed-out counter update retried counts twice);
  interleaved, ``duration`` seconds each, 3 times;
- **flush latency** p50/p99: the store's ``write`` as the flusher saw it;
- **restore of 100k counters** (10k with ``--quick``): ``keepcount.open`` —
  the claim, which re-asserts the whole partition (read at QUORUM, write it
  all again at the new incarnation's timestamp, then a tombstone), and the
  load — against a bare QUORUM read of the same partition;
- **a new store**: ``keepcount.open`` of a keyspace that does not exist yet
  (keepcount creates it and its tables: every change on one node, one wait
  for the nodes to agree) against the same keyspace and tables created
  statement by statement through a driver session with its defaults (a wait
  for agreement after each change), alternately on keyspaces of their own,
  ``repeats`` times each.

Afterwards the stored total is read back: it must equal the acknowledged
increments.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import keepcount
from keepcount.bench import cassandra_scale
from keepcount.bench.measure import interleave, median, percentile, probe_writes
from keepcount.bench.result import BenchError, BenchResult, Comparison, Report, Settings
from keepcount.metrics import CounterChild

__all__ = ["WRITERS", "run"]

WRITERS = 64
LABEL_SETS = 8
_NAME = "bench_cassandra_total"
_GRACE = 60.0


def run(settings: Settings, report: Report) -> BenchResult:
    from keepcount.cluster.cassandra import CassandraCluster

    nodes = 1 if settings.quick else 3
    restore_n = 10_000 if settings.quick else 100_000
    repeats = 2 if settings.quick else 3
    steps = 2 * repeats + 5
    result = BenchResult(
        "cassandra", f"Cassandra store ({nodes} node{'s' * (nodes > 1)}, QUORUM) vs counter columns"
    )
    with tempfile.TemporaryDirectory(prefix="cassandra-", dir=settings.workdir) as tmp:
        report(0, steps, f"cassandra: starting {nodes} Cassandra node(s)")
        try:
            cluster = CassandraCluster(Path(tmp) / "cassandra", nodes=nodes)
        except FileNotFoundError as exc:
            raise BenchError(str(exc)) from None
        try:
            cluster.start()
            started = cluster.start_seconds
            ks = f"bench_{uuid.uuid4().hex[:8]}"
            url = cluster.url_for(ks)
            durable = _durable(url, settings.duration, repeats, report, steps)
            report(steps - 2, steps, f"cassandra: restore of {restore_n:,} counters")
            restore = cassandra_scale.restore(url, restore_n)
            report(steps - 1, steps, "cassandra: new stores vs their tables through the driver")
            created = _new_stores(cluster.url_for, repeats)
        finally:
            cluster.stop()
    ours, peer, flushes, acked = durable
    peer_name = "Cassandra counter columns, UPDATE v = v + 1 at QUORUM"
    result.comparisons = [
        Comparison(
            "acknowledged increments/s, 64 writers", "ops/s", median([r[0] for r in ours]),
            median([r[0] for r in peer]), peer_name, None,
            {"keepcount_runs": [r[0] for r in ours], "counter_runs": [r[0] for r in peer]},
            f"{acked / max(len(flushes), 1):.1f} increments per flush",
        ),
        Comparison(
            "increment latency p50", "ms", median([r[1] for r in ours]),
            median([r[1] for r in peer]), peer_name,
        ),
        Comparison(
            "increment latency p99", "ms", median([r[2] for r in ours]),
            median([r[2] for r in peer]), peer_name,
        ),
        Comparison(
            "flush (store write) p50 / p99", "ms", percentile(flushes, 50) * 1e3,
            percentile(flushes, 99) * 1e3, "p99 (same flushes)", None,
            {"flushes": len(flushes)},
        ),
        Comparison(
            f"restore {restore_n:,} counters (open)", "s", restore["open_s"], restore["bare_s"],
            "bare QUORUM read of the partition", None, restore,
            f"restore_seconds {restore['restore_seconds']:.2f} s",
        ),
        _new_store_comparison(created),
    ]  # fmt: skip
    result.notes = {
        "cassandra_nodes": nodes,
        "cassandra_start_s": started,
        "writers": WRITERS,
        "label_sets": LABEL_SETS,
        "duration_s": settings.duration,
        "repeats": repeats,
        "acknowledged": acked,
        "flushes": len(flushes),
        "restore_counters": restore_n,
    }
    return result


def _durable(
    url: str, duration: float, repeats: int, report: Report, steps: int
) -> tuple[list[tuple[float, float, float]], list[tuple[float, float, float]], list[float], int]:
    reg = keepcount.open(url, node="bench")
    flushes: list[float] = []
    store: Any = reg.store
    probe_writes(store, lambda seconds, *_: flushes.append(seconds))
    try:
        fam = reg.counter(_NAME, "cassandra benchmark", ["route", "status"])
        children = [fam.labels(f"/r{i // 2}", str(200 + i % 2)) for i in range(LABEL_SETS)]
        session = store._session
        ks = store.keyspace  # validated by the store's URL parser: [A-Za-z0-9_]
        session.execute(
            f"CREATE TABLE IF NOT EXISTS {ks}.counter_peer (k text PRIMARY KEY, v counter)"
        )
        update = session.prepare(f"UPDATE {ks}.counter_peer SET v = v + 1 WHERE k = ?")  # noqa: S608
        acked = 0
        ours: list[tuple[float, float, float]] = []
        peer: list[tuple[float, float, float]] = []

        def ours_once() -> float:
            nonlocal acked
            report(1 + len(ours) * 2, steps, f"cassandra: keepcount {len(ours) + 1}/{repeats}")
            lat = asyncio.run(_loop(lambda i: _commit(reg, children[i % LABEL_SETS]), duration))
            acked += len(lat)
            ours.append(_stats(lat, duration))
            return ours[-1][0]

        def peer_once() -> float:
            report(
                2 + len(peer) * 2, steps, f"cassandra: counter columns {len(peer) + 1}/{repeats}"
            )
            lat = asyncio.run(
                _loop(lambda i: _execute(session, update, (f"k{i % LABEL_SETS}",)), duration)
            )
            peer.append(_stats(lat, duration))
            return peer[-1][0]

        interleave(ours_once, peer_once, repeats)
        stored = 0
        for series in reg.cluster(_NAME):  # read back from the store, not from memory
            assert isinstance(series.value, int)
            stored += series.value
        if stored != acked:
            raise BenchError(f"the store holds {stored} increments, {acked} were acknowledged")
    finally:
        reg.close()
    return ours, peer, flushes, acked


async def _commit(reg: keepcount.Registry, child: CounterChild) -> None:
    child.inc()
    await reg.commit()


async def _execute(session: Any, statement: Any, params: tuple[Any, ...]) -> None:
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()

    def settle(exc: BaseException | None) -> None:
        if done.done():
            return
        if exc is None:
            done.set_result(None)
        else:
            done.set_exception(exc)

    def ok(_: Any) -> None:
        loop.call_soon_threadsafe(settle, None)

    def failed(exc: BaseException) -> None:
        loop.call_soon_threadsafe(settle, exc)

    session.execute_async(statement, params).add_callbacks(ok, failed)
    await done


async def _loop(op: Callable[[int], Any], duration: float) -> list[float]:
    """``WRITERS`` tasks, each awaiting ``op(i)`` in a loop for ``duration``."""
    latencies: list[float] = []
    deadline = time.perf_counter() + duration

    async def writer(i: int) -> None:
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            await op(i)
            latencies.append(time.perf_counter() - started)

    await asyncio.wait_for(asyncio.gather(*(writer(i) for i in range(WRITERS))), duration + _GRACE)
    if not latencies:
        raise BenchError("no increment was acknowledged")
    return latencies


def _stats(latencies: list[float], duration: float) -> tuple[float, float, float]:
    return (
        len(latencies) / duration,
        percentile(latencies, 50) * 1e3,
        percentile(latencies, 99) * 1e3,
    )


# -- a new store -------------------------------------------------------------------


def _new_stores(url: Callable[[str], str], samples: int) -> dict[str, list[float]]:
    """Alternately: ``keepcount.open`` of a new keyspace, and the same
    keyspace and tables created through a driver session with its defaults."""
    from cassandra.cluster import EXEC_PROFILE_DEFAULT, Cluster, ExecutionProfile
    from cassandra.policies import RoundRobinPolicy

    from keepcount.stores.cassandra.session import (
        DEFAULT_REPLICATION,
        KEYSPACE,
        SCHEMA,
        parse_url,
    )

    ours: list[float] = []
    peer: list[float] = []
    tag = uuid.uuid4().hex[:8]
    hosts, _ = parse_url(url("x"))
    profile = ExecutionProfile(load_balancing_policy=RoundRobinPolicy())
    client = Cluster(
        contact_points=[h for h, _ in hosts], port=hosts[0][1], protocol_version=5,
        execution_profiles={EXEC_PROFILE_DEFAULT: profile},
    )  # fmt: skip
    try:
        session = client.connect()
        rf = min(DEFAULT_REPLICATION, len(hosts))
        for i in range(samples):
            started = time.perf_counter()
            reg = keepcount.open(url(f"bench_new_{tag}_{i}"), node="new", flush_interval=None)
            ours.append(time.perf_counter() - started)
            reg.close()
            ks = parse_url(url(f"bench_bare_{tag}_{i}"))[1]
            started = time.perf_counter()
            session.execute(KEYSPACE.format(ks=ks, rf=rf))
            for statement in SCHEMA:
                session.execute(statement.format(ks=ks))
            peer.append(time.perf_counter() - started)
    finally:
        client.shutdown()
    return {"ours": ours, "peer": peer}


def _new_store_comparison(created: dict[str, list[float]]) -> Comparison:
    ours, peer = created["ours"], created["peer"]
    return Comparison(
        "open a new store", "s", median(ours), median(peer),
        "its keyspace and tables created through the driver, a wait for agreement after each",
        None, {"ours": ours, "peer": peer},
        "keepcount.open: connect, create, claim, restore (nothing)",
    )  # fmt: skip
