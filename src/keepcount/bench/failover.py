"""``failover``: what a node's death costs a live cluster (DESIGN §9, issue 4).

A local cluster (``keepcount.cluster.supervisor``: 3 nodes on SQLite, etcd,
and HAProxy — then the same with NGINX) under keyed load from 16 clients
(``KeyedLoad``: every increment carries an Idempotency-Key and is retried
with it until acknowledged).  After ``duration`` seconds of steady load,
nodes are SIGKILLed one at a time (round robin), each once its predecessor
is ready again and ``duration`` more seconds passed.  For every kill:

- **LB routed away**: from the SIGKILL until the balancer stopped routing to
  the node (HAProxy's stats; NGINX's error log line);
- **ready again**: until the new incarnation answered ``/readyz`` 200 (the
  supervisor evicts the dead incarnation's claim, so this does not wait out
  the claim's TTL — the figure it is compared with);
- **client-visible errors**: answers other than 200 the clients saw;
- **throughput during the fault**: acknowledgements per second from the
  kill until ready again, against the steady state before the first kill
  (target >= (N-1)/N).

At the end the clients' tally must equal the cluster's totals, or the
benchmark fails.  The load generator is Python (aiohttp): it, not the
cluster, bounds the steady throughput, which is what the ratio needs.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from keepcount.bench.result import BenchError, BenchResult, Comparison, Report, Settings, Target

__all__ = ["CLIENTS", "NODES", "run"]

NODES = 3
CLIENTS = 16
_NAME = "bench_failover_total"
_LABELS = [{"shop": s} for s in ("a", "b", "c", "d")]
TOTALS_TIMEOUT = 60.0
"""Seconds the final read of the cluster totals may take (the session's deadline)."""


def run(settings: Settings, report: Report) -> BenchResult:
    kills = 1 if settings.quick else 2 * NODES
    result = BenchResult("failover", f"failover: SIGKILL a node of {NODES} under keyed load")
    notes: dict[str, Any] = {"nodes": NODES, "clients": CLIENTS, "kills_per_balancer": kills}
    for i, lb in enumerate(("haproxy", "nginx")):
        with tempfile.TemporaryDirectory(prefix=f"failover-{lb}-", dir=settings.workdir) as tmp:
            measured = asyncio.run(
                _measure(Path(tmp), lb, kills, settings.duration, report, i * (kills + 1))
            )
        result.comparisons += _comparisons(lb, measured)
        notes[lb] = {k: v for k, v in measured.items() if k != "faults"}
        notes[lb]["faults"] = measured["faults"]
    result.notes = notes
    return result


async def _measure(
    directory: Path, lb: str, kills: int, steady: float, report: Report, offset: int
) -> dict[str, Any]:
    from keepcount.cluster.faults import FaultError, kill, until
    from keepcount.cluster.spec import ClusterSpec
    from keepcount.cluster.supervisor import Supervisor
    from keepcount.cluster.workload import KeyedLoad, labels_key
    from keepcount.httpclient import exchange, new_session

    total = 2 * (kills + 1)
    report(offset, total, f"failover: starting a cluster behind {lb}")
    spec = ClusterSpec.allocate(directory / "cluster", nodes=NODES, lb=lb, coordinator="etcd")
    spec.save()
    sup = Supervisor(spec, api=False)
    sup_task = asyncio.create_task(sup.run())
    load = KeyedLoad(spec.lb_url, _NAME, _LABELS, clients=CLIENTS, seed=11)
    stop = asyncio.Event()
    faults = []
    try:
        await until(sup.ready.is_set, sup_task, 120, "the cluster did not start")
        async with new_session(timeout=TOTALS_TIMEOUT) as session:
            load_task = asyncio.create_task(load.run(session, stop))
            await asyncio.sleep(1.0)  # warm-up: connections, first declarations
            steady_start = time.time()
            await asyncio.sleep(steady)
            steady_end = time.time()
            for k in range(kills):
                node = spec.nodes[k % NODES].id
                report(offset + k + 1, total, f"failover ({lb}): SIGKILL {node}")
                faults.append(await kill(sup, node, sup_task))
                await asyncio.sleep(steady)
            stop.set()
            await asyncio.wait_for(load_task, 120)
            _, raw = await exchange(session, "GET", f"{spec.lb_url}/v1/cluster/counters/{_NAME}")
            body = json.loads(raw)
        totals = {labels_key(c["labels"]): c["value"] for c in body["counters"]}
    except FaultError as exc:
        raise BenchError(f"failover ({lb}): {exc}") from None
    finally:
        stop.set()
        sup.stop()
        await asyncio.wait_for(sup_task, 90)
    if totals != load.tally():
        raise BenchError(f"failover ({lb}): cluster totals {totals} != acknowledged {load.tally()}")
    steady_rate = _rate(load, steady_start, steady_end)
    during = [_rate(load, f.t0, f.t0 + (f.ready or 0.0)) for f in faults]
    return {
        "steady_per_s": steady_rate,
        "during_per_s": during,
        "errors": dict(load.errors),
        "operations": load.ops,
        "acknowledged": sum(load.tally().values()),
        "faults": [
            {"node": f.node, "lb_down": f.lb_down, "detected": f.detected, "ready": f.ready}
            for f in faults
        ],
        "claim_ttl": spec.claim_ttl,
    }


def _rate(load: Any, start: float, end: float) -> float:
    n = sum(1 for a in load.answers if a.status == 200 and start <= a.t < end)
    return n / max(end - start, 1e-9)


def _median(values: list[float | None]) -> float:
    got = [v for v in values if v is not None]
    return float(statistics.median(got)) if got else float("nan")


def _comparisons(lb: str, m: dict[str, Any]) -> list[Comparison]:
    faults = m["faults"]
    lb_down = [f["lb_down"] for f in faults]
    ready = [f["ready"] for f in faults]
    during = m["during_per_s"]
    errors = sum(m["errors"].values())
    target_ratio = (NODES - 1) / NODES
    return [
        Comparison(
            f"{lb}: kill -> LB routed away (median)", "s", _median(lb_down), 1.0,
            "target 1 s", Target("ours", "<", 1.0, "s"),
            {"runs": lb_down}, f"max {max((v for v in lb_down if v is not None), default=0):.3f} s",
        ),
        Comparison(
            f"{lb}: kill -> ready again (median)", "s", _median(ready), m["claim_ttl"],
            "the claim's TTL (waited out without eviction)", Target("ours", "<", 3.0, "s"),
            {"runs": ready}, f"max {max(ready):.3f} s",
        ),
        Comparison(
            f"{lb}: client-visible errors", "errors", float(errors), float(m["operations"]),
            "keyed increments sent", Target("ours", "<=", 0.0, "errors"), dict(m["errors"]),
        ),
        Comparison(
            f"{lb}: throughput during a fault (median)", "ops/s", _median(during),
            m["steady_per_s"], "steady state, same run", Target("ratio", ">=", target_ratio),
            {"runs": during}, f"min {min(during) / m['steady_per_s']:.2f}x",
        ),
    ]  # fmt: skip
