"""``cassandra-scale``'s node-process measurements: HTTP increments and kill -> ready.

- ``http_points``: one node process on the Cassandra store (this module run
  as ``python -m keepcount.bench.cassandra_http``: ``keepcount node`` served
  by ``keepcount.node.server.serve``, the same app and server, plus
  ``GET /bench/flushes``), driven by wrk with ``CLIENTS`` connections,
  unkeyed and with a unique ``Idempotency-Key`` per request (the bodies,
  path and read-back of ``keepcount.bench.http``).  ``/bench/flushes``
  times the node's own store writes (a probe on its registry's store,
  installed by the first call) and hands back those since the last call:
  the HTTP latency is compared with the flush latency of the very same
  node under the very same load.  Afterwards the totals read back from the
  store must hold every acknowledged increment.
- ``kill_ready``: ``keepcount node`` processes (the product's own command)
  claiming through etcd; each is SIGKILLed, its claim evicted as the
  cluster's failure detector does once it reaped the process (so the
  restart does not wait out the claim's TTL), started again, and timed
  until ``/readyz`` answers 200 with every series restored.
"""

from __future__ import annotations

import json
import signal
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from keepcount.bench.http import _BODIES, _PATH, _stored
from keepcount.bench.measure import median, percentile, probe_writes
from keepcount.bench.result import BenchError, Comparison, Target
from keepcount.bench.wrk import WrkRun, require_wrk, run_wrk
from keepcount.nodeproc import NodeProcess, free_port, http_get, http_request

__all__ = [
    "CLIENTS",
    "FLUSHES_PATH",
    "HttpPoint",
    "http_comparisons",
    "http_points",
    "kill_comparison",
    "kill_ready",
    "main",
    "require_wrk",
]

CLIENTS = (8, 64)
"""wrk connections of each HTTP point."""
THREADS = 2
FLUSHES_PATH = "/bench/flushes"
READY_TIMEOUT = 600.0
"""Seconds a node may take to restore and turn ready."""


# -- the node process ----------------------------------------------------------------


class _FlushProbe:
    """Times the node's store writes; ``take()`` returns and forgets them."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seconds: list[float] = []
        self._store: Any = None

    def install(self, store: Any) -> None:
        if self._store is store:
            return
        probe_writes(store, self._record)
        self._store = store

    def _record(self, seconds: float, *_: Any) -> None:
        with self._lock:
            self._seconds.append(seconds)

    def take(self) -> list[float]:
        with self._lock:
            taken, self._seconds = self._seconds, []
        return taken


_PROBE = _FlushProbe()


async def _flushes(request: Request) -> Response:
    registry = request.app.state.node.registry
    if registry is None:
        return Response(b'{"error": "not ready"}', 503, media_type="application/json")
    _PROBE.install(registry.store)
    return Response(json.dumps({"flushes": _PROBE.take()}), media_type="application/json")


@click.command(help="keepcount node with the benchmark's flush probe (GET /bench/flushes).")
@click.option("--id", "node_id", required=True)
@click.option("--store", required=True)
@click.option("--listen", required=True)
def main(node_id: str, store: str, listen: str) -> None:
    from keepcount.node import NodeConfig
    from keepcount.node.server import parse_listen, serve

    host, port = parse_listen(listen)
    config = NodeConfig(node=node_id, store=store)
    raise SystemExit(serve(config, host, port, routes=[Route(FLUSHES_PATH, _flushes)]))


# -- HTTP increments -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HttpPoint:
    clients: int
    keyed: bool
    wrk: WrkRun
    flushes: list[float]
    """The node's store writes during the wrk run, seconds."""

    @property
    def flush_p50_ms(self) -> float:
        return percentile(self.flushes, 50) * 1e3

    def to_json(self) -> dict[str, Any]:
        return {
            "clients": self.clients,
            "keyed": self.keyed,
            "per_s": self.wrk.per_s,
            "p50_ms": self.wrk.p50_ms,
            "p99_ms": self.wrk.p99_ms,
            "ok": self.wrk.ok,
            "flushes": len(self.flushes),
            "flush_p50_ms": self.flush_p50_ms,
            "flush_p99_ms": percentile(self.flushes, 99) * 1e3,
            "flush_mean_ms": sum(self.flushes) / len(self.flushes) * 1e3,
            "flusher_busy": self.busy,
        }

    @property
    def busy(self) -> float:
        """The store writes that ended during the wrk run over its length: one
        flush is in flight at a time, so ~100% is a flusher that never idled
        (a little over: the first one may have started before the run)."""
        return sum(self.flushes) / self.wrk.seconds


def http_points(
    url: str, workdir: Path, duration: float, step: Callable[[str], None]
) -> list[HttpPoint]:
    """Per ``CLIENTS`` count: unkeyed, then keyed wrk runs of ``duration`` s."""
    node = NodeProcess(
        "http-scale", url, port=free_port(), log=workdir / "http-node.log",
        module="keepcount.bench.cassandra_http", command=(),
    )  # fmt: skip
    step("starting a keepcount node on the store")
    node.start()
    points: list[HttpPoint] = []
    try:
        try:
            node.wait_ready(timeout=READY_TIMEOUT)
        except (RuntimeError, TimeoutError) as exc:
            raise BenchError(str(exc)) from None
        _take_flushes(node)

        def increment() -> tuple[int, bytes]:
            return http_request(
                "POST", node.host, node.port, _PATH, _BODIES[0].encode(), timeout=30,
                headers={"Content-Type": "application/json"},
            )  # fmt: skip

        def wrk(clients: int, keyed: bool, seconds: float, warm_up: bool = False) -> WrkRun:
            got = run_wrk(
                node.url, _PATH, _BODIES, connections=clients, threads=THREADS,
                duration=seconds, workdir=workdir,
                key_prefix=f"{uuid.uuid4().hex[:12]}-" if keyed else None,
            )  # fmt: skip
            if not warm_up and (got.non_2xx or got.socket_errors or not got.ok):
                status, body = increment()  # what an increment answers now, for the message
                raise BenchError(
                    f"wrk, {clients} connections: {got.ok} ok, {got.non_2xx} non-2xx, "
                    f"{got.socket_errors} socket errors; one more increment: {status} "
                    f"{body[:300]!r}{node.log_tail()}"
                )
            return got

        status, body = increment()  # declares the family: the first flush is the slowest
        if status != 200:
            raise BenchError(f"the first increment: {status} {body[:300]!r}{node.log_tail()}")
        acked = 1
        # Warm-up, not measured: whatever it answers, a non-2xx may still have counted.
        warm = [wrk(max(CLIENTS), keyed, 2, warm_up=True) for keyed in (False, True)]
        acked += sum(r.ok for r in warm)
        in_flight = sum(max(CLIENTS) + r.non_2xx + r.socket_errors for r in warm)
        runs: list[tuple[int, WrkRun]] = []
        for clients in CLIENTS:
            for keyed in (False, True):
                step(f"HTTP increments, {clients} clients{', keyed' * keyed}")
                _take_flushes(node)
                got = wrk(clients, keyed, duration)
                flushes = _take_flushes(node)
                if not flushes:
                    raise BenchError("the node made no store write during a wrk run")
                points.append(HttpPoint(clients, keyed, got, flushes))
                runs.append((clients, got))
        acked += sum(r.ok for _, r in runs)
        in_flight += sum(c for c, _ in runs)  # one per connection as each run stopped
        stored = _stored(node)
        if not acked <= stored <= acked + in_flight:
            raise BenchError(
                f"the store holds {stored} increments; wrk saw {acked} acknowledged "
                f"(at most {in_flight} more may have been in flight)"
            )
        step("stopping the node (SIGTERM)")
        node.signal(signal.SIGTERM)
        code = node.wait(60)
        if code != 0:
            raise BenchError(f"the node exited with {code} on SIGTERM{node.log_tail()}")
    finally:
        node.stop()
    return points


def _take_flushes(node: NodeProcess) -> list[float]:
    status, body = http_get(node.host, node.port, FLUSHES_PATH, timeout=10)
    if status != 200:
        raise BenchError(f"{FLUSHES_PATH}: {status} {body[:300]!r}")
    flushes: list[float] = json.loads(body)["flushes"]
    return flushes


def http_comparisons(points: list[HttpPoint], target: Target) -> list[Comparison]:
    peer = "the node's own flush (store write) p50, same wrk run"
    return [
        Comparison(
            f"HTTP increment p50, {p.clients} clients{', keyed' * p.keyed}", "ms",
            p.wrk.p50_ms, p.flush_p50_ms, peer, target, p.to_json(),
            f"p99 {p.wrk.p99_ms:.1f} ms; flush p99 {percentile(p.flushes, 99) * 1e3:.1f} ms, "
            f"mean {sum(p.flushes) / len(p.flushes) * 1e3:.1f} ms; "
            f"{p.wrk.per_s:,.0f}/s, {p.wrk.ok / len(p.flushes):.1f} per flush, "
            f"flusher busy {p.busy:.0%}",
        )
        for p in points
    ]  # fmt: skip


# -- kill -> ready -------------------------------------------------------------------


def kill_ready(
    url: str,
    coordinator: str,
    workdir: Path,
    nodes: Mapping[str, int],
    repeats: int,
    step: Callable[[str], None],
) -> dict[str, Any]:
    """``nodes``: node id -> series it holds.  Start each (claiming through
    ``coordinator``), then ``repeats`` rounds of SIGKILL, evict, start, ready."""
    from keepcount.coordination import open_coordinator

    coord = open_coordinator(coordinator)
    extra = ["--coordinator", coordinator]
    procs = {
        node: NodeProcess(node, url, port=free_port(), log=workdir / f"{node}.log", extra=extra)
        for node in nodes
    }
    seconds: dict[str, list[float]] = {node: [] for node in nodes}
    restore: dict[str, list[float]] = {node: [] for node in nodes}
    try:
        step(f"starting {', '.join(nodes)}")
        first = {node: _start(proc, nodes[node]) for node, proc in procs.items()}
        for r in range(repeats):
            for node, proc in procs.items():
                step(f"kill -> ready of {node} ({nodes[node]:,} series) {r + 1}/{repeats}")
                pid = proc.pid
                started = time.perf_counter()
                proc.kill()
                member = coord.members().get(node)
                if member is not None and member.info.get("pid") == str(pid):
                    coord.evict(node, member.epoch)
                restore[node].append(_start(proc, nodes[node]))
                seconds[node].append(time.perf_counter() - started)
    finally:
        for proc in procs.values():
            proc.stop()
        coord.close()
    return {"seconds": seconds, "restore_seconds": restore, "first_restore_seconds": first}


def _start(proc: NodeProcess, series: int) -> float:
    """Start ``proc``, await ``/readyz`` 200; its ``restore_seconds``."""
    proc.start()
    try:
        proc.wait_ready(timeout=READY_TIMEOUT)
    except (RuntimeError, TimeoutError) as exc:
        raise BenchError(str(exc)) from None
    status, body = http_get(proc.host, proc.port, "/readyz", timeout=10)
    ready = json.loads(body)
    if status != 200 or ready["restored_series"] != series:
        raise BenchError(f"{proc.node}: /readyz {status}, {ready}; expected {series} series")
    return float(ready["restore_seconds"])


def kill_comparison(kill: dict[str, Any], n: int) -> Comparison:
    full, empty = kill["seconds"]["kill-full"], kill["seconds"]["kill-empty"]
    restore = kill["restore_seconds"]["kill-full"]
    return Comparison(
        f"kill -> ready, node of {n:,} series", "s", median(full), median(empty),
        "kill -> ready of a node id holding nothing", None, kill,
        f"restore_seconds {median(restore):.2f} s (median of {len(full)})",
    )  # fmt: skip


if __name__ == "__main__":
    main()
