"""``http``: durable HTTP increments/s against the same endpoint acknowledged
from memory, and against a no-op endpoint of the same server.

One ``keepcount node`` process (``keepcount.bench.httpnode``: the product's
node plus ``POST /bench/noop``) on a SQLite file; wrk with 64 connections
posts the same JSON bodies alternately to ``/v1/counters/{name}/increment``
(answered only once the increment is durable) and to the no-op endpoint
(answered at once), ``repeats`` times each, then once more per repeat with
a unique ``Idempotency-Key`` on every increment.  Beside it a second node
process, the same code started with ``--unsafe-ack-before-durable``, answers
the same increments as soon as they are in memory: durable / memory is what
durability alone costs (target >= 0.8), durable / no-op what the whole
increment costs on top of the server stack (target >= 0.8).

Every figure is checked against the store afterwards: the cluster total
read back from the node must lie between the increments wrk saw answered
200 and that plus the requests that may have been in flight when each wrk
run stopped (one per connection).  The node is then stopped with SIGTERM and
must exit 0 (flushed, claim released).
"""

from __future__ import annotations

import json
import signal
import tempfile
import uuid
from pathlib import Path

from keepcount.bench.measure import latency_comparisons, median
from keepcount.bench.result import BenchError, BenchResult, Comparison, Report, Settings, Target
from keepcount.bench.wrk import WrkRun, require_wrk, run_wrk
from keepcount.nodeproc import NodeProcess, free_port, http_get

__all__ = ["CONNECTIONS", "NOOP_PATH", "TARGET", "run"]

CONNECTIONS = 64
THREADS = 2  # wrk's; the node is one process with one event loop
LABEL_SETS = 8
TARGET = Target("ratio", ">=", 0.8)
"""Durable increments against the memory-acknowledged ones, and against the no-op."""
NOOP_PATH = "/bench/noop"
"""The no-op endpoint ``keepcount.bench.httpnode`` adds."""
_NAME = "bench_http_total"
_PATH = f"/v1/counters/{_NAME}/increment"
_BODIES = [
    json.dumps({"labels": {"route": f"/r{i // 2}", "status": str(200 + i % 2)}, "by": 1})
    for i in range(LABEL_SETS)
]


def run(settings: Settings, report: Report) -> BenchResult:
    require_wrk()
    repeats = 1 if settings.quick else 3
    steps = 4 * repeats + 2
    result = BenchResult("http", f"durable HTTP increments/s, {CONNECTIONS} connections (wrk)")
    with tempfile.TemporaryDirectory(prefix="http-", dir=settings.workdir) as tmp:
        work = Path(tmp)
        node, memory = (
            NodeProcess(
                name,
                f"sqlite:///{work}/{name}.db",
                port=free_port(),
                log=work / f"{name}.log",
                module="keepcount.bench.httpnode",
                command=(),
                extra=extra,
            )
            for name, extra in [("bench", ()), ("memory", ("--unsafe-ack-before-durable",))]
        )
        report(0, steps, "http: starting the nodes")
        node.start()
        memory.start()
        try:
            for started in (node, memory):
                try:
                    started.wait_ready(timeout=30)
                except (RuntimeError, TimeoutError) as exc:
                    raise BenchError(str(exc)) from None

            def wrk(
                path: str,
                key_prefix: str | None = None,
                duration: float = 0,
                target: NodeProcess = node,
            ) -> WrkRun:
                got = run_wrk(
                    target.url,
                    path,
                    _BODIES,
                    connections=CONNECTIONS,
                    threads=THREADS,
                    duration=duration or settings.duration,
                    workdir=work,
                    key_prefix=key_prefix,
                )
                if got.non_2xx or got.socket_errors or not got.ok:
                    raise BenchError(
                        f"wrk against {path}: {got.ok} ok, {got.non_2xx} non-2xx, "
                        f"{got.socket_errors} socket errors{target.log_tail()}"
                    )
                return got

            report(1, steps, "http: warm-up")
            warm = [wrk(_PATH, duration=1), wrk(NOOP_PATH, duration=1)]
            wrk(_PATH, duration=1, target=memory)
            ours: list[WrkRun] = []
            fast: list[WrkRun] = []
            peer: list[WrkRun] = []
            keyed: list[WrkRun] = []
            for i in range(repeats):
                report(2 + 4 * i, steps, f"http: durable increments {i + 1}/{repeats}")
                ours.append(wrk(_PATH))
                report(3 + 4 * i, steps, f"http: acknowledged from memory {i + 1}/{repeats}")
                fast.append(wrk(_PATH, target=memory))
                report(4 + 4 * i, steps, f"http: no-op endpoint {i + 1}/{repeats}")
                peer.append(wrk(NOOP_PATH))
                report(5 + 4 * i, steps, f"http: keyed increments {i + 1}/{repeats}")
                keyed.append(wrk(_PATH, key_prefix=f"{uuid.uuid4().hex[:12]}-"))
            increments = [warm[0], *ours, *keyed]
            acked = sum(r.ok for r in increments)
            stored = _stored(node)
            in_flight = CONNECTIONS * len(increments)
            if not acked <= stored <= acked + in_flight:
                raise BenchError(
                    f"the store holds {stored} increments; wrk saw {acked} acknowledged "
                    f"(at most {in_flight} more may have been in flight)"
                )
            report(steps - 1, steps, "http: stopping the nodes (SIGTERM)")
            for stopping in (node, memory):
                stopping.signal(signal.SIGTERM)
                code = stopping.wait(30)
                if code != 0:
                    raise BenchError(
                        f"{stopping.node} exited with {code} on SIGTERM{stopping.log_tail()}"
                    )
        finally:
            node.stop()
            memory.stop()
    peer_name = "no-op POST endpoint, same node process"
    memory_name = "the same increments acknowledged from memory (--unsafe-ack-before-durable)"
    result.comparisons = [
        Comparison(
            "durable increments/s vs acknowledged from memory",
            "ops/s",
            median([r.per_s for r in ours]),
            median([r.per_s for r in fast]),
            memory_name,
            TARGET,
            {"memory_runs": [r.per_s for r in fast]},
            note=(
                f"from memory: p50 {median([r.p50_ms for r in fast]):.2f} ms, "
                f"p99 {median([r.p99_ms for r in fast]):.2f} ms"
            ),
        ),
        Comparison(
            "durable increments/s",
            "ops/s",
            median([r.per_s for r in ours]),
            median([r.per_s for r in peer]),
            peer_name,
            TARGET,
            {"keepcount_runs": [r.per_s for r in ours], "noop_runs": [r.per_s for r in peer]},
        ),
        *latency_comparisons(ours, peer, peer_name),
        Comparison(
            "keyed increments/s (unique Idempotency-Key each)",
            "ops/s",
            median([r.per_s for r in keyed]),
            median([r.per_s for r in peer]),
            peer_name,
            detail={"keyed_runs": [r.per_s for r in keyed]},
            note=(
                f"p50 {median([r.p50_ms for r in keyed]):.2f} ms, "
                f"p99 {median([r.p99_ms for r in keyed]):.2f} ms"
            ),
        ),
    ]
    result.notes = {
        "connections": CONNECTIONS,
        "wrk_threads": THREADS,
        "label_sets": LABEL_SETS,
        "duration_s": settings.duration,
        "repeats": repeats,
        "acknowledged": acked,
        "stored": stored,
        "store": "SQLite WAL, synchronous=FULL",
        "server": "uvicorn (uvloop, httptools) + Starlette, one process",
    }
    return result


def _stored(node: NodeProcess) -> int:
    status, body = http_get(node.host, node.port, f"/v1/cluster/counters/{_NAME}", timeout=30)
    if status != 200:
        raise BenchError(f"reading the totals back: {status} {body[:300]!r}")
    return sum(int(c["value"]) for c in json.loads(body)["counters"])
