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
- ``clock``: jump one node's wall clock (``keepcount.cluster.clocks``:
  libfaketime, only ``CLOCK_REALTIME``) forwards by 30 min to 3 h, then
  backwards to 10 to 60 min behind the real time, then back to it, each
  step drawn from the seed, asserted visible in the node's answers (its
  ``Date`` header) and held ``hold`` seconds.  Claims and leases run on the
  monotonic clock, so a jump must change nothing: the node keeps its
  incarnation and its claim's epoch (anything else is a violation, judged
  by ``clock_result``), and the history checkers judge the counts as for
  every fault.  The jumps stay far below the idempotency keys' TTL (24 h by
  default): keys expire by the wall clock (``expires`` is a unix time, and
  Cassandra's TTLs count from it), so a node whose clock is J seconds ahead
  sees every key J seconds older, and one J behind writes keys that live J
  seconds less; a jump near the TTL would forget keys within their TTL, as
  any TTL would, and a retried keyed increment could then count twice.
  The cluster's nodes run on jumpable clocks only when the run has this
  fault (``ClusterSpec.extra["clocks"]``).
- ``corrupt``: a flipped bit in a stopped node's stored value
  (``keepcount.cluster.corrupt``).  SQLite: the node is stopped, one of its
  counter values flipped in the copies SQLite reads (while the other nodes
  go on writing the file), the node killed; its new incarnations must
  refuse the store (``CorruptStore``) and never turn ready, and the other
  nodes' totals that read the row must fail rather than count it (the
  history checkers judge those); then the byte is put back and the node
  comes back.  An incarnation that served the flipped value makes the run
  invalid (``corrupt_result``).  Cassandra: one replica flushed, killed, a
  bit flipped in each of its ``node_rows`` SSTables, restarted and held
  ``hold`` seconds, then the bits put back; values must never go backwards
  (the history checkers).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from keepcount.cluster import clocks
from keepcount.cluster.corrupt import CorruptOutcome, corrupt_cassandra, corrupt_sqlite
from keepcount.cluster.faults import kill, partition, pause
from keepcount.cluster.partition import endpoints_of, unavailable
from keepcount.cluster.spec import slot_name
from keepcount.verify.verdict import Fault, Result

__all__ = ["KINDS", "Nemesis"]

KINDS = ("kill", "pause", "store", "coordinator", "partition", "clock", "corrupt")
CLOCK_AHEAD = (30 * 60, 3 * 3600)
"""Seconds a clock fault first puts a node's wall clock ahead (drawn between)."""
CLOCK_BEHIND = (10 * 60, 3600)
"""Seconds it then puts it behind the real time (drawn between)."""


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
    jumps: int = 0
    """Wall clock jumps injected (each one seen in the node's answers)."""
    clock_violations: list[str] = field(default_factory=list)
    """What a clock jump changed (it must change nothing)."""
    flips: list[CorruptOutcome] = field(default_factory=list)
    """What each ``corrupt`` fault saw."""

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
        store = self.sup.spec.store
        if "corrupt" in self.kinds and not (store == "cassandra" or store.startswith("sqlite:")):
            self.unavailable["corrupt"] = (
                "the Bigtable emulator keeps its data in memory: nothing on disk to flip"
                if store == "bigtable"
                else f"the store {store} is not on this host (run with --store sqlite or cassandra)"
            )
        if "clock" in self.kinds:
            why = clocks.unavailable()
            if why is None and self.sup.launcher.clocks is None:
                why = "the cluster was started without jumpable clocks (extra['clocks'])"
            if why is not None:
                self.unavailable["clock"] = why

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
        elif kind == "corrupt":
            target = await self._corrupt(rnd)
        elif kind == "clock":
            target = await self._clock(rnd)
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

    async def _clock(self, rnd: random.Random) -> str:
        """One node's wall clock ahead, behind, then right again (see the
        module docstring); its incarnation and epoch must not change."""
        sup = self.sup
        node = rnd.choice(sorted(sup.nodes))
        await _until_ready(sup, 60)
        ns = sup.nodes[node]
        before = ns.current
        assert before is not None
        epoch = before.epoch
        offsets = [rnd.randint(*CLOCK_AHEAD), -rnd.randint(*CLOCK_BEHIND), 0]

        def url() -> str | None:
            cur = ns.current
            return cur.process.url if cur is not None and cur.ready else None

        for offset in offsets:
            self.log(f"nemesis: {node}'s wall clock to {_hours(offset)}")
            await clocks.jump(sup.launcher.clocks, node, url, offset)
            self.jumps += 1
            await asyncio.sleep(self.hold)  # the node runs on that clock a while
        after = ns.current
        if after is not before or before.epoch != epoch:
            self.clock_violations.append(
                f"{node}: clock jumps {[_hours(o) for o in offsets]} changed its process "
                f"(incarnation {before.number} pid {before.pid} epoch {epoch} -> "
                + ("none" if after is None else
                   f"incarnation {after.number} pid {after.pid} epoch {after.epoch}")
                + f", {ns.restarts} restarts in all)"
            )  # fmt: skip
        return f"{node} ({', '.join(_hours(o) for o in offsets)})"

    async def _corrupt(self, rnd: random.Random) -> str:
        sup = self.sup
        await _until_ready(sup, 60)
        if sup.spec.store == "cassandra":
            outcome = await corrupt_cassandra(sup, rnd, self.hold)
        else:
            outcome = await corrupt_sqlite(sup, rnd.choice(sorted(sup.nodes)), rnd)
        self.flips.append(outcome)
        self.log(f"nemesis: flipped a bit of {outcome.node} ({outcome.target}): "
                 + ("refused" if outcome.refused else outcome.detail)
                 + f"; {outcome.repaired} copies put back")  # fmt: skip
        await _until_ready(sup, 90)
        return f"{outcome.node} ({outcome.target})"

    def corrupt_result(self) -> Result | None:
        """The corrupt faults' verdict (None without any): invalid if a node
        served a flipped value; unknown if no flip was refused."""
        if "corrupt" not in self.runnable:
            return None
        served = [f"{f.node}: {f.target}: {f.detail}" for f in self.flips if f.served]
        refused = sum(f.refused for f in self.flips)
        details = {"flips": len(self.flips), "refused": refused, "served": len(served),
                   "healed": sum(f.healed for f in self.flips),
                   "survived": sum(f.survived for f in self.flips)}  # fmt: skip
        tested = refused + details["survived"]
        valid = False if served else (True if tested else None)
        summary = (f"{len(self.flips)} flipped bits: {refused} refused by the node, "
                   f"{details['survived']} survived by the replicas, {len(served)} served")  # fmt: skip
        return Result("corrupt", valid, summary, details, served)

    def clock_result(self) -> Result | None:
        """The clock faults' verdict (None without any): valid if no jump
        changed a node's incarnation or epoch."""
        if "clock" not in self.runnable:
            return None
        bad = self.clock_violations
        summary = f"{self.jumps} wall clock jumps, " + (
            f"{len(bad)} changed a node" if bad else "none changed a node's claim"
        )
        return Result("clock", not bad, summary, {"jumps": self.jumps}, list(bad))

    async def _kill_server(self, servers: Any, i: int, what: str) -> None:
        """SIGKILL server ``i`` of ``servers``, ``hold`` seconds, restart it."""
        self.log(f"nemesis: SIGKILL {what} for {self.hold:g} s")
        await asyncio.to_thread(servers.kill, i)
        await asyncio.sleep(self.hold)
        await asyncio.to_thread(servers.restart, i)

    async def heal(self) -> None:
        """Every fault undone: nodes ready (the supervisor restarts them)."""
        await _until_ready(self.sup, 90)


def _hours(offset: float) -> str:
    """``+2h13m``, ``-0h41m``, ``0``: a clock offset for people."""
    if offset == 0:
        return "0"
    minutes = round(abs(offset) / 60)
    return f"{'+' if offset > 0 else '-'}{minutes // 60}h{minutes % 60:02d}m"


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
