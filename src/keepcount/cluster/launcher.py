"""The supervisor's launcher: incarnations of node ids, slots, restart backoff.

A node id (``NodeState``) runs as a sequence of *incarnations*
(``Incarnation``): one ``keepcount node`` process each, on one of the id's two
slots (``keepcount.cluster.spec``).  ``Launcher.start`` starts the next one on
a slot no live process of the id holds (a paused old incarnation still holds
its port); ``Launcher.backoff`` says how long to wait before restarting an id
that keeps failing.  ``node_argv`` is the one place the ``keepcount node``
command line of an incarnation is written.

What the launcher does not do: notice exits and lost claims (the failure
detector, ``keepcount.cluster.detector``) or log events (``keepcount.cluster.events``).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from keepcount.cluster.clocks import Clocks
from keepcount.cluster.events import EventLog
from keepcount.cluster.partition import Partitions
from keepcount.cluster.spec import ClusterSpec, NodeSpec, slot_name
from keepcount.node.config import NodeConfig
from keepcount.nodeproc import NodeProcess
from keepcount.process import process_state

__all__ = ["BACKOFF", "STABLE_AFTER", "Incarnation", "Launcher", "NodeState", "node_argv"]

BACKOFF = (0.0, 0.25, 0.5, 1.0, 2.0, 5.0)
"""Delay before the n-th restart in a row of a node that keeps failing.  A
computed schedule, not a retry loop: the detector restarts on an exit it
awaited, and this only says when (tenacity's waits are for loops that call
the same function again)."""
STABLE_AFTER = 10.0
"""A node that ran this long has its restart backoff reset."""


def node_argv(
    node: str,
    store: str,
    listen: tuple[str, int],
    coordinator: str,
    claim_ttl: float,
    extra: Sequence[str] = (),
) -> list[str]:
    """The options of ``keepcount node`` for one incarnation: its
    ``NodeConfig`` (id, store, the coordinator it claims its id in, the
    claim's TTL) as ``NodeConfig.to_argv()`` spells it, its address, then
    ``extra`` (``ClusterSpec.extra["node_args"]``)."""
    config = NodeConfig(node=node, store=store, coordinator=coordinator, claim_ttl=claim_ttl)
    return [*config.to_argv(), "--listen", f"{listen[0]}:{listen[1]}", *extra]


@dataclass(eq=False)
class Incarnation:
    """One process running a node id."""

    node: str
    number: int
    slot: int
    process: NodeProcess
    started: float = field(default_factory=time.time)
    started_mono: float = field(default_factory=time.monotonic)
    epoch: int | None = None
    claimed: bool = False
    """The coordinator listed this very process as the holder at least once."""
    absent_since: float | None = None
    ready: bool = False
    ready_at: float | None = None
    readyz: dict[str, Any] = field(default_factory=dict)
    probe: str = "starting"
    """starting (not listening yet) | restoring (503) | ready | unresponsive"""
    exit_code: int | None = None
    stale: bool = False
    """Replaced while still alive (lost its claim): never restarted."""

    @property
    def pid(self) -> int:
        return self.process.pid

    def state(self) -> str:
        """down | paused | fenced | starting | restoring | ready | unresponsive."""
        if self.exit_code is not None:
            return "down"
        if process_state(self.pid) == "T":
            return "paused"
        if self.stale:
            return "fenced"
        return self.probe


@dataclass(eq=False)
class NodeState:
    """A node id: its current incarnation, the replaced ones still alive, counts."""

    spec: NodeSpec
    current: Incarnation | None = None
    stale: list[Incarnation] = field(default_factory=list)
    incarnations: int = 0
    restarts: int = 0
    failures: int = 0
    """Restarts in a row without a stable run (sets the backoff)."""
    next_start: float | None = 0.0
    """Monotonic time the next incarnation may start; None while one runs."""


class Launcher:
    """Starts the incarnations of a cluster's node ids (see the module docstring).

    ``store_url`` and ``coordinator_url`` are set once the servers run;
    ``partitions``, if set, gets every new process into its slot's cgroup at
    spawn (``keepcount.cluster.partition``); ``clocks``, if set, puts it on its
    node id's jumpable wall clock (``keepcount.cluster.clocks``).
    """

    def __init__(self, spec: ClusterSpec, events: EventLog) -> None:
        self.spec = spec
        self.events = events
        self.store_url = spec.store
        self.coordinator_url = ""
        self.partitions: Partitions | None = None
        self.clocks = Clocks(spec.directory / "clocks") if spec.extra.get("clocks") else None
        """Each node id's wall clock offset (``keepcount.cluster.clocks``), if
        the spec asks for jumpable clocks (``extra["clocks"]``)."""

    @property
    def logs(self) -> Path:
        """The directory of the nodes' logs (one per slot)."""
        return self.spec.directory / "nodes"

    def start(self, ns: NodeState) -> Incarnation:
        """Start the next incarnation of ``ns`` and make it current.  Its slot:
        the last one if free, else one no live old incarnation holds; with
        both held, the oldest old incarnation is killed for its slot."""
        spec = self.spec
        busy = {old.slot for old in ns.stale if old.exit_code is None}
        last = ns.current.slot if ns.current is not None else None
        free = [s for s in (0, 1) if s not in busy]
        if not free:  # two live old incarnations: the oldest has to go
            oldest = ns.stale[0]
            oldest.process.kill()
            free = [oldest.slot]
        slot = last if last in free else free[0]
        ns.incarnations += 1
        if ns.incarnations > 1:
            ns.restarts += 1
        name = slot_name(ns.spec.id, slot)
        port = ns.spec.ports[slot]
        options = node_argv(
            ns.spec.id, self.store_url, (spec.host, port), self.coordinator_url,
            spec.claim_ttl, spec.extra.get("node_args", []),
        )  # fmt: skip
        proc = NodeProcess(
            ns.spec.id, self.store_url, port=port, host=spec.host,
            log=self.logs / f"{name}.log", options=options,
            env=None if self.clocks is None else self.clocks.env(ns.spec.id),
        )  # fmt: skip
        proc.start()
        if self.partitions is not None:  # before the child's Python opens a socket
            self.partitions.adopt(name, proc.pid)
        inc = Incarnation(ns.spec.id, ns.incarnations, slot, proc)
        ns.current = inc
        ns.next_start = None
        self.events.append(
            "started", ns.spec.id, pid=inc.pid, slot=name, incarnation=inc.number, port=port
        )
        return inc

    def backoff(self, ns: NodeState, ran: float) -> float:
        """Seconds to wait before restarting ``ns``, whose incarnation exited
        after running ``ran`` seconds: 0 for the first failure in a row,
        growing along ``BACKOFF``; a stable run resets it.  Sets ``next_start``."""
        if ran >= STABLE_AFTER:
            ns.failures = 0
        delay = BACKOFF[min(ns.failures, len(BACKOFF) - 1)]
        ns.failures += 1
        ns.next_start = time.monotonic() + delay
        return delay
