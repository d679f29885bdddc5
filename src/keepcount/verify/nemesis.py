"""The nemesis: faults on a schedule drawn from a seed, so a failing run replays.

One fault at a time, then ``quiet`` seconds without any; each fault's window
(start, end in the run's clock) is recorded for the checkers and the report.

- ``kill``: SIGKILL a keepcount node; the supervisor restarts it; the window
  ends once its new incarnation is ready.
- ``pause``: SIGSTOP a node past its claim's TTL (outside an SQLite write:
  see ``Supervisor.signal(clean=True)``); the supervisor replaces it; then
  SIGCONT the old process, which must acknowledge nothing more and stop.
- ``store``: SIGKILL one Cassandra replica, ``hold`` seconds, restart it
  (only with a local Cassandra store).
- ``coordinator``: SIGKILL one etcd member (or the ZooKeeper server),
  ``hold`` seconds, restart it.
- ``partition``: cut one node process off the network
  (``keepcount.cluster.partition``: its slot's cgroup, nftables rules on
  loopback), in a mode drawn from the seed: ``isolate`` (nobody reaches it,
  it reaches nobody), ``coordinator`` (it cannot renew its claim; the load
  balancer still reaches it) or ``store`` (it cannot write: Cassandra only).
  The first two hold until the node's id is served by a new incarnation,
  then heal; the old process must then find its claim lost and stop.
  ``store`` holds ``hold`` seconds.  Needs root and nftables; the run says
  why when it cannot.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from keepcount.cluster.faults import kill, partition, pause
from keepcount.cluster.partition import endpoints_of, unavailable
from keepcount.cluster.spec import slot_name
from keepcount.verify.verdict import Fault

__all__ = ["KINDS", "Nemesis"]

KINDS = ("kill", "pause", "store", "coordinator", "partition")


@dataclass
class Nemesis:
    sup: Any
    """The cluster's ``Supervisor``."""
    kinds: Sequence[str]
    seed: int
    clock: Callable[[], float]
    """The run's clock (seconds since its start)."""
    quiet: float = 4.0
    hold: float = 4.0
    faults: list[Fault] = field(default_factory=list)
    unavailable: dict[str, str] = field(default_factory=dict)
    """kind -> why it cannot run here."""
    log: Callable[[str], None] = print

    def __post_init__(self) -> None:
        unknown = sorted(set(self.kinds) - set(KINDS))
        if unknown:
            raise ValueError(f"unknown fault kinds {unknown}: choose from {KINDS}")
        if "store" in self.kinds and self.sup.spec.store != "cassandra":
            self.unavailable["store"] = (
                "the store is not a local Cassandra cluster (run with --store cassandra)"
            )
        if "partition" in self.kinds and self.sup.partitions is None:
            self.unavailable["partition"] = unavailable() or (
                "the cluster was started without partitions (Supervisor.partitions)"
            )

    @property
    def runnable(self) -> list[str]:
        return [k for k in self.kinds if k not in self.unavailable]

    async def run(self, stop: asyncio.Event) -> None:
        rnd = random.Random(self.seed)
        kinds = self.runnable
        if not kinds:
            await stop.wait()
            return
        await _wait(stop, self.quiet)
        while not stop.is_set():
            kind = rnd.choice(kinds)
            await self._one(kind, rnd)
            await _wait(stop, self.quiet)

    async def _one(self, kind: str, rnd: random.Random) -> None:
        sup = self.sup
        nodes = sorted(sup.nodes)
        start = self.clock()
        if kind == "kill":
            target = rnd.choice(nodes)
            self.log(f"nemesis: SIGKILL {target}")
            await kill(sup, target)
        elif kind == "pause":
            target = rnd.choice(nodes)
            self.log(f"nemesis: SIGSTOP {target} past its claim's TTL, then SIGCONT")
            await pause(sup, target)
        elif kind == "store":
            i = rnd.randrange(len(sup.store_servers.nodes))
            target = f"cassandra-{i}"
            await self._kill_server(sup.store_servers, i, f"Cassandra node {i}")
        elif kind == "partition":
            target = await self._partition(rnd)
        else:  # coordinator
            i = rnd.randrange(len(sup.servers.members))
            target = f"{sup.spec.coordinator}-{i}"
            await self._kill_server(sup.servers, i, f"{sup.spec.coordinator} member {i}")
            await _until_ready(sup, 60)
        self.faults.append(Fault(kind, target, start, self.clock()))

    async def _partition(self, rnd: random.Random) -> str:
        sup = self.sup
        modes = ["isolate", "coordinator", *(["store"] if endpoints_of(sup.store_url) else [])]
        mode = rnd.choice(modes)
        node = rnd.choice(sorted(sup.nodes))
        await _until_ready(sup, 60)
        ns = sup.nodes[node]
        assert ns.current is not None
        slot = slot_name(node, ns.current.slot)
        self.log(f"nemesis: partition {slot} ({mode})")
        fault = await partition(sup, node, mode, self.hold)
        if mode != "store" and fault.zombie_exit is None:
            self.log(f"nemesis: the partitioned {slot} did not stop within 30 s of healing")
        await _until_ready(sup, 60)
        return f"{node} ({slot}, {mode})"

    async def _kill_server(self, servers: Any, i: int, what: str) -> None:
        """SIGKILL server ``i`` of ``servers``, ``hold`` seconds, restart it."""
        self.log(f"nemesis: SIGKILL {what} for {self.hold:g} s")
        await asyncio.to_thread(servers.kill, i)
        await asyncio.sleep(self.hold)
        await asyncio.to_thread(servers.restart, i)

    async def heal(self) -> None:
        """Every fault undone: nodes ready (the supervisor restarts them)."""
        await _until_ready(self.sup, 90)


async def _until_ready(sup: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(ns.current is not None and ns.current.ready for ns in sup.nodes.values()):
            return
        await asyncio.sleep(0.05)
    raise TimeoutError(f"the cluster was not whole again within {timeout:g} s")


async def _wait(stop: asyncio.Event, seconds: float) -> None:
    try:
        await asyncio.wait_for(stop.wait(), seconds)
    except TimeoutError:
        pass
