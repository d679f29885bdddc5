"""Issue 17: a Cassandra replica SIGKILLed and restarted under keyed load
stalls no acknowledgement, and loses nothing.

A supervised keepcount cluster (3 nodes, HAProxy, etcd) stores its counters
in a fresh keyspace of the session's 3-node Cassandra cluster (RF=3,
QUORUM); 8 clients send keyed increments through HAProxy.  One replica is
SIGKILLed, stays down until the others' failure detectors have convicted it
(the window in which Paxos still counts it as a participant), and is
started again.  Every increment is timed from its first send to its
acknowledgement (its retries included): none may wait more than
``MAX_WAIT``.  Issue 17's target is 2 s (``TARGET``), reported.

Why it could stall, in three layers (docs/design.md, "A replica's death"):
before issue 17, requests in flight to the dead coordinator failed and
their retries contended (5.5 s); after it, the stall was intermittent (1
run in 4-5: 5.3-10.6 s, one CI failure at 10.6 s), because with Paxos v1
a lightweight transaction that loses a round waits for every participant,
the unconvicted dead replica included, for ``write_request_timeout``, and
one slow key failed its whole flush, whose keyed requests were resent to
other nodes and contended in turn.  The local cluster now runs Paxos v2,
one undecided key fails only its own request, and HAProxy waits 2.5 s (more
than Cassandra's 2 s write timeout) before resending: 0.29-0.48 s in 8 of 8
runs.  ``MAX_WAIT`` stays the bound that separates a stall from none.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
from clusters import running, wait_for

from keepcount.cluster.cassandra import CassandraCluster
from keepcount.cluster.workload import KeyedLoad, labels_key

pytestmark = [pytest.mark.cluster, pytest.mark.slow, pytest.mark.g1]

NAME = "orders_total"
LABELS = [{"shop": s} for s in ("a", "b", "c")]
VICTIM = 2
CLIENTS = 8
TARGET = 2.0
"""Issue 17's target for the longest acknowledgement wait, replica kill and
restart included: reported, not asserted (see the module docstring)."""
MAX_WAIT = 4.0
"""Seconds an increment may wait for its acknowledgement: no stall."""


@dataclass
class TimedLoad(KeyedLoad):
    """``KeyedLoad`` that also times each increment, from its first send to
    its acknowledgement: ``waits`` holds (time.time() of the answer, seconds)."""

    waits: list[tuple[float, float]] = field(default_factory=list)
    _first: dict[str, float] = field(default_factory=dict)

    async def _send(
        self, session: aiohttp.ClientSession, path: str, body: str, headers: dict[str, str],
        labels: dict[str, str], by: int,
    ) -> bool:  # fmt: skip
        key = headers["Idempotency-Key"]
        started = self._first.setdefault(key, time.monotonic())
        acknowledged = await super()._send(session, path, body, headers, labels, by)
        if acknowledged:
            del self._first[key]
            self.waits.append((time.time(), time.monotonic() - started))
        return acknowledged

    def acks(self) -> int:
        return len(self.waits)

    def longest(self, start: float = 0.0, end: float = float("inf")) -> float:
        return max((w for t, w in self.waits if start <= t < end), default=0.0)


async def totals(session: aiohttp.ClientSession, url: str) -> dict[str, int]:
    async with session.get(f"{url}/v1/cluster/counters/{NAME}") as r:
        body = await r.json()
        assert r.status == 200, body
    return {labels_key(c["labels"]): c["value"] for c in body["counters"]}


def test_a_replica_killed_and_restarted_stalls_no_acknowledgement(
    tmp_path: Path, cassandra_up: CassandraCluster, cassandra_url: str
) -> None:
    """SIGKILL of one replica of three, conviction, restart: every keyed
    increment acknowledged within MAX_WAIT s, and the cluster's totals equal
    the acknowledged increments."""
    asyncio.run(_kill_and_restart(tmp_path, cassandra_up, cassandra_url))


async def _kill_and_restart(tmp_path: Path, cassandra: CassandraCluster, url: str) -> None:
    marks: dict[str, float] = {}
    async with running(tmp_path, nodes=3, store=url) as sup:
        load = TimedLoad(sup.spec.lb_url, NAME, LABELS, clients=CLIENTS, seed=17)
        stop = asyncio.Event()
        async with aiohttp.ClientSession() as session:
            task = asyncio.create_task(load.run(session, stop))
            try:
                await wait_for(lambda: load.acks() >= 300, 60, "first acknowledgements")
                marks["kill"] = time.time()
                await asyncio.to_thread(cassandra.kill, VICTIM)
                # Down until every live node's failure detector convicted it
                # (~10 s): the window in which Paxos still waits for it.
                await asyncio.to_thread(cassandra.wait_down, VICTIM, 60.0)
                marks["convicted"] = time.time()
                down = load.acks()
                await wait_for(lambda: load.acks() >= down + 200, 30,
                               "acknowledgements with 2 of 3 replicas")  # fmt: skip
                marks["restart"] = time.time()
                await asyncio.to_thread(cassandra.restart, VICTIM)
                marks["up"] = time.time()
                up = load.acks()
                await wait_for(lambda: load.acks() >= up + 300, 30, "acknowledgements after")
            finally:
                stop.set()
                await asyncio.wait_for(task, 120)
            final = await totals(session, sup.spec.lb_url)
    marks["end"] = time.time()
    spans = [(f"{a}..{b}", ta, tb) for (a, ta), (b, tb) in itertools.pairwise(marks.items())]
    phases = {"before": load.longest(end=marks["kill"])}
    phases |= {name: load.longest(ta, tb) for name, ta, tb in spans}
    print(
        f"\nlongest acknowledgement wait {load.longest():.3f} s; by phase (s): "
        f"{ {k: round(v, 3) for k, v in phases.items()} }; "
        f"phases took (s): { {name: round(tb - ta, 1) for name, ta, tb in spans} }; "
        f"increments {load.acks()}, ops {load.ops}, errors {dict(load.errors)}; "
        f"issue 17's {TARGET} s target {'met' if load.longest() <= TARGET else 'MISSED'}"
    )
    assert final == load.tally(), "every acknowledged increment, each once"
    assert load.longest() <= MAX_WAIT, (
        f"an increment waited {load.longest():.3f} s for its acknowledgement "
        f"(at most {MAX_WAIT} s); by phase: {phases}"
    )
