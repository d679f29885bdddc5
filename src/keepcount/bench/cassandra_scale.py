"""``cassandra-scale``: the Cassandra store at scale (issue 17).

On one local Apache Cassandra cluster started for the run (3 nodes, RF=3,
everything at QUORUM; 1 node with ``--quick``), each figure beside a peer
measured in the same run:

- **restore** of 10k / 100k / 1M series (1k / 10k with ``--quick``):
  ``keepcount.open(url, node, max_children=None)`` of a node id holding N
  counter series (the claim, which re-asserts the partition, and the load)
  against a bare QUORUM read of the same partition through the registry's
  own session, once its background read of created times is done (one
  keyspace per size, one sample each); ``Registry.restore_seconds`` beside
  it.  Target: ratio <= 1.3.
- **flush** p50 / p99: the store's ``write`` of 256 dirty series (a
  registry, ``commit_sync`` in a loop; the batch and the fencing read that
  follows it) against one bare single-partition UNLOGGED batch at QUORUM of
  the same rows, built and sent with the driver on the same session (to a
  partition of the same table no claim owns), alternately, bounded by
  ``2 * duration`` seconds.  Target: p50 ratio <= 1.3.
- **HTTP increments** p50 / p99 through one ``keepcount node`` process on the
  store, 8 and 64 wrk connections, unkeyed and with a unique
  ``Idempotency-Key`` each (``keepcount.bench.cassandra_http``), against that
  node's own flush latency during the same wrk run.  Target: HTTP p50 <= 2 x
  flush p50.
- **kill -> ready** of a ``keepcount node`` holding 100k series (10k with
  ``--quick``; written through the registry before the node starts): SIGKILL,
  its etcd claim evicted as the cluster's failure detector does, started
  again, until ``/readyz`` answers 200; against the same for a node id
  holding nothing.
- **cluster totals** of 6 node ids x 100k series (6 x 5k with ``--quick``):
  ``read_cluster()`` of a new store handle and ``Registry.cluster()`` of a
  new registry (nothing cached), and ``read_cluster()`` called again on the
  same handle with nothing changed and after one node flushed, medians of 3,
  against bare QUORUM reads of the 6 partitions one after another.

The longest acknowledgement wait around a Cassandra replica kill is
measured by ``tests/system/test_cassandra_replica_kill.py``, not here.
Every figure is checked: the restored and totalled series counts, the
flushed rows, the HTTP increments read back from the store.
"""

from __future__ import annotations

import functools
import logging
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import keepcount
from keepcount.bench.measure import median, percentile, probe_writes
from keepcount.bench.result import BenchError, BenchResult, Comparison, Report, Settings, Target
from keepcount.errors import KeepcountError, StoreUnavailable
from keepcount.totals import SeriesTotal

__all__ = ["FLUSH_SERIES", "TOTALS_NODES", "run", "sizes", "write_series"]

FLUSH_SERIES = 256
"""Dirty series per measured flush."""
TOTALS_NODES = 6
RESTORE_TARGET = Target("ratio", "<=", 1.3)
FLUSH_TARGET = Target("ratio", "<=", 1.3)
HTTP_TARGET = Target("ratio", "<=", 2.0)
SERIES_NAME = "scale_total"
BARE_NODE = "bench-bare-batch"
"""The partition the bare batches write: in the store's table, claimed by nobody."""
_MAX_FLUSHES = 2000
_COMMIT_TIMEOUT = 60.0
_WRITE_TRIES = 5
WRITE_CHUNK = 50_000
"""Series per commit when writing a node id's series."""
log = logging.getLogger(__name__)
_BARE = "bare QUORUM read of the partition"


def sizes(quick: bool) -> tuple[int, ...]:
    """Series per node id of the restore measurements."""
    return (1_000, 10_000) if quick else (10_000, 100_000, 1_000_000)


def run(settings: Settings, report: Report) -> BenchResult:
    from keepcount.bench import cassandra_http
    from keepcount.cluster.cassandra import CassandraCluster
    from keepcount.cluster.etcd import EtcdCluster, etcd_binary

    quick = settings.quick
    nodes = 1 if quick else 3
    kill_n = 10_000 if quick else 100_000
    totals_n = 5_000 if quick else 100_000
    kill_repeats = 1 if quick else 3
    http_points = len(cassandra_http.CLIENTS) * 2
    steps = 1 + len(sizes(quick)) + 1 + (http_points + 2) + (2 + 2 * kill_repeats)
    steps += TOTALS_NODES + 1
    done = 0

    def step(text: str) -> None:
        nonlocal done
        report(done, steps, f"cassandra-scale: {text}")
        done += 1

    cassandra_http.require_wrk()
    result = BenchResult(
        "cassandra-scale",
        f"Cassandra store at scale ({nodes} node{'s' * (nodes > 1)}, QUORUM)",
    )
    with tempfile.TemporaryDirectory(prefix="cassandra-scale-", dir=settings.workdir) as tmp:
        work = Path(tmp)
        step(f"starting {nodes} Cassandra node(s) and etcd")
        try:
            cluster = CassandraCluster(work / "cassandra", nodes=nodes)
            etcd = EtcdCluster(work / "etcd", members=1)
            etcd_binary()
        except FileNotFoundError as exc:
            raise BenchError(str(exc)) from None
        prefix = f"scale_{uuid.uuid4().hex[:8]}"

        def url(part: str) -> str:
            return cluster.url_for(f"{prefix}_{part}")

        try:
            cluster.start()
            etcd.start()
            restores = []
            for n in sizes(quick):
                step(f"writing and restoring {n:,} series")
                restores.append((n, restore(url(f"r{n}"), n)))
            step(f"flushes of {FLUSH_SERIES} series vs bare batches")
            flush = _flush(url("flush"), 2 * settings.duration)
            http = cassandra_http.http_points(url("http"), work, settings.duration, step)
            step(f"writing {kill_n:,} series for kill -> ready")
            kill_write_s = write_series(url("kill"), "kill-full", kill_n)
            kill = cassandra_http.kill_ready(
                url("kill"),
                etcd.url_for(prefix),
                work,
                {"kill-full": kill_n, "kill-empty": 0},
                kill_repeats,
                step,
            )
            totals = _totals(url("totals"), totals_n, step)
        except KeepcountError as exc:  # the store failed a measure: say so in one line
            raise BenchError(f"{type(exc).__name__}: {exc}") from exc
        finally:
            etcd.stop()
            cluster.stop()
    result.comparisons = [
        *(_restore_comparison(n, r) for n, r in restores),
        *_flush_comparisons(flush),
        *cassandra_http.http_comparisons(http, HTTP_TARGET),
        cassandra_http.kill_comparison(kill, kill_n),
        *_totals_comparisons(totals, totals_n),
    ]
    result.notes = {
        "cassandra_nodes": nodes,
        "cassandra_start_s": cluster.start_seconds,
        "duration_s": settings.duration,
        "restore_sizes": list(sizes(quick)),
        "flush_series": FLUSH_SERIES,
        "flushes": len(flush["ours"]),
        "kill_series": kill_n,
        "kill_write_s": kill_write_s,
        "kill_repeats": kill_repeats,
        "totals_nodes": TOTALS_NODES,
        "totals_series_per_node": totals_n,
        "totals_write_s": totals["write_s"],
        "http": [p.to_json() for p in http],
    }
    return result


def write_series(url: str, node: str, n: int) -> float:
    """``n`` counter series (``series-0000000`` = 1, ...) into ``node`` through
    one registry, committed every ``WRITE_CHUNK`` series (each commit tried up
    to ``_WRITE_TRIES`` times) and closed; the seconds it took, retries included."""
    started = time.perf_counter()
    with keepcount.open(url, node=node, max_children=None, flush_interval=None) as reg:
        if reg.node != node:
            raise BenchError(f"opened slot {reg.node!r}, not {node!r}: is {node!r} held?")
        fam = reg.counter(SERIES_NAME, "cassandra-scale benchmark", ["k"])
        for start in range(0, n, WRITE_CHUNK):
            for i in range(start, min(n, start + WRITE_CHUNK)):
                fam.labels(f"series-{i:07d}").inc(i + 1)
            _commit(reg, f"writing {n:,} series into {node}")
    return time.perf_counter() - started


def _commit(reg: keepcount.Registry, what: str) -> None:
    for attempt in range(1, _WRITE_TRIES + 1):
        try:
            reg.commit_sync(timeout=_COMMIT_TIMEOUT + WRITE_CHUNK / 500)
            return
        except StoreUnavailable as exc:  # OutcomeUnknown too
            # Set-up, not a measure: a replica's write timeout on a busy
            # machine puts the series back as dirty; write them again.
            if attempt == _WRITE_TRIES:
                raise BenchError(f"{what}: {exc}") from None
            log.warning("%s, attempt %d: %s", what, attempt, exc)


def restore(url: str, n: int) -> dict[str, Any]:
    """Write ``n`` series into one node id, then time its ``keepcount.open``
    and, once the registry's background read of created times is done, a
    bare read of its partition on the registry's own session.

    Also ``keepcount bench cassandra``'s restore.  The commit timeout grows
    with ``n`` (1M series take minutes to write on 3 nodes), and the
    background read is kept out of the bare one's way."""
    node = "restore"
    write_s = write_series(url, node, n)
    started = time.perf_counter()
    reg = keepcount.open(url, node=node, max_children=None)
    open_s = time.perf_counter() - started
    try:
        restore_seconds, restored = reg.restore_seconds, reg.restored_series
        if not reg.wait_created(timeout=_COMMIT_TIMEOUT + n / 500):
            raise BenchError(f"the created times of {n:,} series did not load")
        created_s = time.perf_counter() - started
        store: Any = reg.store
        started = time.perf_counter()
        rows = list(store._session.execute(store._q.rows, (node,)))
        bare_s = time.perf_counter() - started
    finally:
        reg.close()
    if restored != n:
        raise BenchError(f"restored {restored} series of {n}")
    return {"open_s": open_s, "restore_seconds": restore_seconds, "bare_s": bare_s,
            "rows": len(rows), "write_s": write_s, "created_loaded_s": created_s}  # fmt: skip


def _restore_comparison(n: int, r: dict[str, Any]) -> Comparison:
    return Comparison(
        f"restore {n:,} series (open)", "s", r["open_s"], r["bare_s"], _BARE, RESTORE_TARGET, r,
        f"restore_seconds {r['restore_seconds']:.2f} s ({r['restore_seconds'] / r['bare_s']:.2f}x "
        f"the bare read; open also connects); written in {r['write_s']:.1f} s",
    )  # fmt: skip


# -- flush ---------------------------------------------------------------------------


def _flush(url: str, budget: float) -> dict[str, list[float]]:
    """Alternately: a registry flush of ``FLUSH_SERIES`` dirty series (the
    store's ``write``, timed by a probe on the registry's store), then one
    bare batch of the rows that flush wrote; until ``budget`` seconds or
    ``_MAX_FLUSHES`` pairs."""
    from cassandra import ConsistencyLevel
    from cassandra.query import BatchStatement, BatchType

    ours: list[float] = []
    peer: list[float] = []
    written: list[Sequence[Any]] = []
    reg = keepcount.open(url, node="flush", max_children=None, flush_interval=None)
    try:
        store: Any = reg.store

        def timed(seconds: float, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            ours.append(seconds)
            written.append(args[3] if len(args) > 3 else kwargs["series"])

        probe_writes(store, timed)
        fam = reg.counter(SERIES_NAME, "cassandra-scale flushes", ["k"])
        children = [fam.labels(f"series-{i:07d}") for i in range(FLUSH_SERIES)]
        session = store._session
        ks = store.keyspace  # validated by the store's URL parser: [A-Za-z0-9_]
        insert = session.prepare(
            f"INSERT INTO {ks}.node_rows (node, name, labels, ival) "  # noqa: S608
            "VALUES (?, ?, ?, ?) USING TIMESTAMP ?"
        )

        def bare(rows: Sequence[Any], ts: int) -> float:
            started = time.perf_counter()
            batch = BatchStatement(BatchType.UNLOGGED, consistency_level=ConsistencyLevel.QUORUM)
            for name, labels, value, _created in rows:
                batch.add(insert, (BARE_NODE, name, labels, value, ts))
            session.execute(batch)
            return time.perf_counter() - started

        deadline = time.perf_counter() + budget
        rounds = 0
        while True:
            for child in children:
                child.inc()
            reg.commit_sync(timeout=_COMMIT_TIMEOUT)
            rows = written[-1]
            if len(rows) != FLUSH_SERIES:
                raise BenchError(f"a flush wrote {len(rows)} series, not {FLUSH_SERIES}")
            peer.append(bare(rows, rounds + 1))
            rounds += 1
            if rounds == 1:  # the first write of each side (created times, prepare): warm-up
                ours.clear()
                peer.clear()
            if rounds > _MAX_FLUSHES or (rounds > 2 and time.perf_counter() > deadline):
                break
        total = _sum(reg.cluster(SERIES_NAME))
    finally:
        reg.close()
    if total != FLUSH_SERIES * rounds:
        raise BenchError(
            f"the store holds {total} increments, {FLUSH_SERIES * rounds} were flushed"
        )
    return {"ours": ours, "peer": peer}


def _flush_comparisons(flush: dict[str, list[float]]) -> list[Comparison]:
    ours, peer = flush["ours"], flush["peer"]
    name = f"bare UNLOGGED batch of the same {FLUSH_SERIES} rows at QUORUM, same session"
    return [
        Comparison(
            f"flush of {FLUSH_SERIES} series p{q}", "ms", percentile(ours, q) * 1e3,
            percentile(peer, q) * 1e3, name, FLUSH_TARGET if q == 50 else None,
            {"flushes": len(ours)} if q == 50 else {},
            "store.write: the batch + the fencing read" if q == 50 else "",
        )
        for q in (50, 99)
    ]  # fmt: skip


def _sum(totals: Sequence[SeriesTotal]) -> int:
    out = 0
    for t in totals:
        if not isinstance(t.value, int):
            raise BenchError(f"{t.name}: not a counter value: {t.value!r}")
        out += t.value
    return out


# -- cluster totals ------------------------------------------------------------------


def _totals(url: str, n: int, step: Callable[[str], None]) -> dict[str, Any]:
    """``TOTALS_NODES`` node ids of ``n`` series each, then 3 rounds of:
    ``read_cluster()`` on a new store handle (nothing cached), the bare reads,
    ``read_cluster()`` again on that handle (nothing changed), again once one
    node flushed an increment, and ``Registry.cluster()`` of a new registry."""
    from keepcount.stores import open_store

    nodes = [f"totals-{i}" for i in range(1, TOTALS_NODES + 1)]
    write_s = []
    for node in nodes:
        step(f"writing {node}: {n:,} series")
        write_s.append(write_series(url, node, n))
    step(f"cluster totals of {TOTALS_NODES} x {n:,} series")
    out: dict[str, list[float]] = {k: [] for k in ("cold", "bare", "same", "changed", "cluster")}
    expected = TOTALS_NODES * n * (n + 1) // 2

    def timed(what: str, call: Callable[[], Any]) -> Any:
        started = time.perf_counter()
        got = call()
        out[what].append(time.perf_counter() - started)
        return got

    def check(what: str, snap: Any) -> None:
        total = sum(int(value) for _, _, _, value in snap.rows)
        if len(snap.rows) != TOTALS_NODES * n or total != expected:
            raise BenchError(f"{what}: {len(snap.rows)} rows, total {total}; not {expected}")

    with keepcount.open(url, node=nodes[0], max_children=None, flush_interval=None) as live:
        bump = live.counter(SERIES_NAME, "cassandra-scale benchmark", ["k"]).labels(
            "series-0000000"
        )
        for _ in range(3):
            store: Any = open_store(url)
            try:
                check("read_cluster", timed("cold", store.read_cluster))
                rows = timed("bare", functools.partial(_bare_reads, store, nodes))
                if rows < TOTALS_NODES * n:  # the series, and each partition's other rows
                    raise BenchError(f"the bare reads gave {rows} rows, not {TOTALS_NODES * n}")
                check("read_cluster again", timed("same", store.read_cluster))
                bump.inc()
                live.commit_sync(timeout=_COMMIT_TIMEOUT)
                expected += 1
                check("read_cluster after a flush", timed("changed", store.read_cluster))
            finally:
                store.close()
            with keepcount.open(url, node="totals-reader") as reader:
                summed = timed("cluster", reader.cluster)
            if len(summed) != n or _sum(summed) != expected:
                raise BenchError(f"Registry.cluster() gave {len(summed)} series, not {n}")
    return {**out, "write_s": write_s}


def _bare_reads(store: Any, nodes: Sequence[str]) -> int:
    """Each node's partition read whole at QUORUM, one after another; the rows."""
    return sum(len(list(store._session.execute(store._q.rows, (node,)))) for node in nodes)


def _totals_comparisons(t: dict[str, Any], n: int) -> list[Comparison]:
    peer = f"bare QUORUM reads of the {TOTALS_NODES} partitions, one after another"
    size = f"{TOTALS_NODES} x {n:,} series"
    bare = median(t["bare"])
    detail = {k: t[k] for k in ("cold", "bare", "same", "changed", "cluster")}
    return [
        Comparison(
            f"cluster totals {size}: read_cluster(), new store handle", "s", median(t["cold"]),
            bare, peer, None, detail, "median of 3 calls, each on a handle of its own",
        ),
        Comparison(
            f"cluster totals {size}: Registry.cluster(), new registry", "s",
            median(t["cluster"]), bare, peer, None, {}, "read_cluster + summing over nodes",
        ),
        Comparison(
            f"cluster totals {size}: read_cluster() again, nothing changed", "s",
            median(t["same"]), bare, peer, None, {}, "the same handle, right after",
        ),
        Comparison(
            f"cluster totals {size}: read_cluster() again, 1 node flushed", "s",
            median(t["changed"]), bare, peer, None, {}, "one increment of one node in between",
        ),
    ]  # fmt: skip
