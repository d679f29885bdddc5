"""The supervisor of a local cluster: its servers, its nodes, the failure detector.

One asyncio program (``keepcount cluster supervise``, started in the
background by ``keepcount cluster up``; ``keepcount demo`` runs one in
process) that:

1. starts the coordinator (etcd as 3 members, or ZooKeeper standalone) and
   the load balancer (HAProxy or NGINX, listing both slots of every node),
   all on 127.0.0.1 with data and logs under the cluster directory;
2. starts one ``keepcount node`` process per node id, with
   ``--coordinator`` so each claims its id with a lease and a fencing epoch;
3. runs the **failure detector**, every ``TICK`` seconds:

   - a node process that exited (killed, crashed, or stopped after losing
     its claim) is reaped; if the coordinator still lists that very process
     as the holder (a killed node's lease outlives it by up to its TTL), its
     claim is evicted at once — safe, because the process is known dead —
     and a new incarnation starts after a backoff (0 s for the first restart
     in a row, growing to ``BACKOFF[-1]``; reset after ``STABLE_AFTER``
     seconds of running).  It claims, restores, then turns ready;
   - a node process that is alive but whose claim the coordinator no longer
     lists (paused with SIGSTOP past its TTL, or cut off) is left alone —
     it can no longer acknowledge anything, and stops by itself if it ever
     runs again — and a new incarnation starts on the node's *other* slot
     (its port is still held by the old process);
   - each current incarnation's ``/readyz`` is probed every ``PROBE_EVERY``
     seconds, for ``status`` and the events log;

4. serves a small control API on ``spec.api_port`` (status, signal a node,
   restart a node, tear everything down) for the CLI.

Every event (started, ready, exited, claim lost, evicted, ...) is appended to
``<dir>/events.jsonl`` with wall and monotonic times: the demo's report and
the failover measurements are read from it.

How production would run the same parts: see the README ("Running a cluster
in production"): systemd units (``Restart=always``) or Kubernetes
(a StatefulSet, readiness probe on ``/readyz``) take the supervisor's place;
the claim and fencing logic lives in the node, not here.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from keepcount.cluster.processes import process_state
from keepcount.cluster.spec import ClusterSpec, NodeSpec, slot_name
from keepcount.errors import InvalidInput, KeepcountError
from keepcount.nodeproc import NodeProcess

__all__ = ["BACKOFF", "Incarnation", "NodeState", "Supervisor", "process_state"]

log = logging.getLogger("keepcount.cluster")

TICK = 0.02
"""Seconds between two passes of the failure detector (process exits are
seen through ``poll()``: cheap)."""
PROBE_EVERY = 0.1
"""Seconds between two ``/readyz`` probes of a node."""
PROBE_TIMEOUT = 0.5
BACKOFF = (0.0, 0.25, 0.5, 1.0, 2.0, 5.0)
"""Delay before the n-th restart in a row of a node that keeps failing."""
STABLE_AFTER = 10.0
"""A node that ran this long has its restart backoff reset."""
ABSENT_GRACE = 0.3
"""Seconds a claimed, live node may be missing from the coordinator's
membership before it is replaced (covers a watch event racing a renewal)."""
STOP_GRACE = 15.0
"""Seconds a node gets to stop after SIGTERM before it is killed."""
EVENTS_FILE = "events.jsonl"
SIGNALS = {"KILL": signal.SIGKILL, "STOP": signal.SIGSTOP, "CONT": signal.SIGCONT,
           "TERM": signal.SIGTERM}  # fmt: skip


def holds_write_lock(pid: int, paths: list[Path]) -> bool:
    """Whether ``pid`` holds an exclusive POSIX lock on any of ``paths``
    (``/proc/locks``).  SQLite in WAL mode takes one on its ``-shm`` file
    while it writes or checkpoints."""
    inodes = set()
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:
            continue
        inodes.add((os.major(st.st_dev), os.minor(st.st_dev), st.st_ino))
    try:
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return False
    for line in lines:
        f = line.split()
        if len(f) < 8 or "->" in f or f[3] != "WRITE" or f[4] != str(pid):
            continue
        major, minor, inode = f[5].split(":")
        if (int(major, 16), int(minor, 16), int(inode)) in inodes:
            return True
    return False


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
        if self.exit_code is not None:
            return "down"
        if process_state(self.pid) == "T":
            return "paused"
        if self.stale:
            return "fenced"
        return self.probe


@dataclass(eq=False)
class NodeState:
    spec: NodeSpec
    current: Incarnation | None = None
    stale: list[Incarnation] = field(default_factory=list)
    incarnations: int = 0
    restarts: int = 0
    failures: int = 0
    """Restarts in a row without a stable run (sets the backoff)."""
    next_start: float | None = 0.0
    """Monotonic time the next incarnation may start; None while one runs."""


class Supervisor:
    """See the module docstring.  ``await run()`` until ``stop()``.

    Example::

        spec = ClusterSpec.allocate(Path("/tmp/c"), nodes=3)
        spec.save()
        sup = Supervisor(spec)
        asyncio.run(sup.run())      # until SIGTERM or POST /api/down
    """

    def __init__(
        self,
        spec: ClusterSpec,
        *,
        on_event: Callable[[dict[str, Any]], None] | None = None,
        api: bool = True,
    ) -> None:
        self.spec = spec
        self.on_event = on_event
        self.nodes = {n.id: NodeState(n) for n in spec.nodes}
        self.events: deque[dict[str, Any]] = deque(maxlen=2000)
        self.event_count = 0
        self.members: dict[str, Any] = {}
        """The coordinator's membership as last seen by its watch."""
        self.members_at: float | None = None
        self.coordinator_url = ""
        self.store_url = spec.store
        """The store the nodes use: ``spec.store``, or the URL of the local
        Cassandra cluster when the spec asks for one (``store = "cassandra"``)."""
        self.store_servers: Any = None
        """That local Cassandra cluster (``CassandraCluster``): fault verbs."""
        self.partitions: Any = None
        """``keepcount.cluster.partition.Partitions``, if set before ``run()``:
        every node process is put in its slot's cgroup at spawn, so that a
        nemesis can cut it off the network."""
        self.started = time.time()
        self.ready = asyncio.Event()
        """Set once every node was ready at least once after start-up."""
        self.failed: str | None = None
        self._api = api
        self._stopping = False
        self._stopped = asyncio.Event()
        self._servers: Any = None
        self._balancer: Any = None
        self._coordinator: Any = None
        self._watch: Any = None
        self._session: aiohttp.ClientSession | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._events_file = spec.directory / EVENTS_FILE

    # -- events ----------------------------------------------------------------

    def event(self, what: str, node: str | None = None, **data: Any) -> dict[str, Any]:
        ev = {"t": time.time(), "mono": time.monotonic(), "event": what, "node": node, **data}
        self.event_count += 1
        ev["seq"] = self.event_count
        self.events.append(ev)
        with open(self._events_file, "a") as f:
            f.write(json.dumps(ev) + "\n")
        if self.on_event is not None:
            self.on_event(ev)
        return ev

    # -- running -----------------------------------------------------------------

    async def run(self) -> None:
        """Start everything, supervise until ``stop()``, tear everything down."""
        self._loop = asyncio.get_running_loop()
        spec = self.spec
        (spec.directory / "nodes").mkdir(parents=True, exist_ok=True)
        self._events_file.write_text("")
        self.event("cluster_starting", lb=spec.lb, coordinator=spec.coordinator, store=spec.store)
        api_task: asyncio.Task[None] | None = None
        try:
            await asyncio.to_thread(self._start_store)
            await asyncio.to_thread(self._start_coordinator)
            await asyncio.to_thread(self._start_balancer)
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=PROBE_TIMEOUT)
            )
            if self._api:
                from keepcount.cluster.api import serve_api

                api_task = asyncio.create_task(serve_api(self), name="keepcount-cluster-api")
            detector = asyncio.create_task(self._detect(), name="keepcount-detector")
            probes = [
                asyncio.create_task(self._probe(n), name=f"keepcount-probe-{n.spec.id}")
                for n in self.nodes.values()
            ]
            await self._stopped.wait()
            for task in (detector, *probes):
                task.cancel()
            await asyncio.gather(detector, *probes, return_exceptions=True)
        except BaseException as exc:
            if not isinstance(exc, asyncio.CancelledError):
                self.failed = f"{type(exc).__name__}: {exc}"
                log.exception("cluster supervisor failed")
            raise
        finally:
            self._stopping = True
            await self._teardown()
            if api_task is not None:
                api_task.cancel()
                await asyncio.gather(api_task, return_exceptions=True)
            self.event("cluster_down")

    def stop(self) -> None:
        """Ask ``run()`` to tear everything down (thread-safe, idempotent)."""
        self._stopping = True
        loop = self._loop
        if loop is None:
            return
        try:
            loop.call_soon_threadsafe(self._stopped.set)
        except RuntimeError:  # the loop already ended
            pass

    @property
    def balancer(self) -> Any:
        """The load balancer (``keepcount.cluster.balancer.LoadBalancer``)."""
        return self._balancer

    @property
    def servers(self) -> Any:
        """The coordinator's servers (``EtcdCluster`` / ``ZooKeeperServer``): fault verbs."""
        return self._servers

    def _start_store(self) -> None:
        """Start the local Cassandra cluster the spec asks for, if it does, and
        create the store's schema once, before the nodes start (concurrent
        schema changes from several clients can conflict in Cassandra 5.0)."""
        spec = self.spec
        if spec.store == "cassandra":
            from keepcount.cluster.cassandra import CassandraCluster

            started = time.monotonic()
            cluster = CassandraCluster(spec.directory / "cassandra", nodes=3)
            self.store_servers = cluster
            cluster.start()
            self.store_url = cluster.url_for("keepcount")
            self.event(
                "store_ready", kind="cassandra", url=self.store_url,
                seconds=round(time.monotonic() - started, 3),
            )  # fmt: skip
        elif spec.store == "bigtable":
            from keepcount.cluster.bigtable import BigtableEmulator

            emulator = BigtableEmulator(spec.directory / "bigtable")
            self.store_servers = emulator
            emulator.start()
            self.store_url = emulator.url_for("keepcount")
            self.event("store_ready", kind="bigtable-emulator", url=self.store_url, seconds=0)
        if not self.store_url.startswith("sqlite:"):
            from keepcount.stores import open_store

            open_store(self.store_url).close()

    def _start_coordinator(self) -> None:
        spec = self.spec
        directory = spec.directory / spec.coordinator
        started = time.monotonic()
        if spec.coordinator == "etcd":
            from keepcount.cluster.etcd import EtcdCluster

            servers: Any = EtcdCluster(directory, members=3)
        else:
            from keepcount.cluster.zookeeper import ZooKeeperServer

            servers = ZooKeeperServer(directory)
        servers.start()
        self._servers = servers
        self.coordinator_url = servers.url_for("keepcount")
        from keepcount.coordination import open_coordinator

        self._coordinator = open_coordinator(self.coordinator_url)
        self._watch = self._coordinator.watch(self._on_members)
        self.event(
            "coordinator_ready",
            kind=spec.coordinator,
            url=self.coordinator_url,
            seconds=round(time.monotonic() - started, 3),
        )

    def _start_balancer(self) -> None:
        from keepcount.cluster.balancer import Backend, make_balancer

        spec = self.spec
        backends = [
            Backend(slot_name(n.id, i), spec.host, port)
            for n in spec.nodes
            for i, port in enumerate(n.ports)
        ]
        started = time.monotonic()
        # A paused node accepts connections and answers nothing: abandon its
        # requests (keyed ones are retried elsewhere) and mark it DOWN within
        # about a second, not the default 2-2.5 s during which every client
        # ends up waiting on it.  An increment is answered in milliseconds.
        opts: dict[str, Any] = (
            {"server_timeout": 1.0, "check_timeout": 0.3}
            if spec.lb == "haproxy"
            else {"read_timeout": 1.0, "send_timeout": 1.0}
        )
        lb = make_balancer(
            spec.lb, spec.directory / spec.lb, (spec.host, spec.lb_port), backends, **opts
        )
        lb.start()
        lb.wait_ready(30)
        self._balancer = lb
        self.event(
            "balancer_ready",
            kind=spec.lb,
            url=spec.lb_url,
            seconds=round(time.monotonic() - started, 3),
        )

    def _on_members(self, members: dict[str, Any]) -> None:
        # The coordinator's watch thread: hand the snapshot to the loop.
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._set_members, dict(members))

    def _set_members(self, members: dict[str, Any]) -> None:
        self.members = members
        self.members_at = time.monotonic()

    # -- the failure detector ---------------------------------------------------

    async def _detect(self) -> None:
        while not self._stopping:
            now = time.monotonic()
            for ns in self.nodes.values():
                cur = ns.current
                if cur is not None:
                    code = cur.process.proc.poll() if cur.process.proc is not None else None
                    if code is not None:
                        await self._exited(ns, cur, code)
                    else:
                        self._check_claim(ns, cur, now)
                for old in list(ns.stale):
                    code = old.process.proc.poll() if old.process.proc is not None else None
                    if code is not None:
                        old.exit_code = code
                        ns.stale.remove(old)
                        self.event("stale_exited", ns.spec.id, pid=old.pid, code=code)
                if ns.current is None and ns.next_start is not None and now >= ns.next_start:
                    self._start_node(ns)  # a fork and exec: milliseconds
            if (
                not self.ready.is_set()
                and all(
                    ns.current is not None and ns.current.ready_at is not None
                    for ns in self.nodes.values()
                )
                and await asyncio.to_thread(self._balancer_routes_to_all)
            ):
                self.ready.set()
                self.event("cluster_ready", seconds=round(time.time() - self.started, 3))
            await asyncio.sleep(TICK)

    async def _exited(self, ns: NodeState, inc: Incarnation, code: int) -> None:
        inc.exit_code = code
        inc.ready = False
        ns.current = None
        ran = time.monotonic() - inc.started_mono
        self.event(
            "exited", ns.spec.id, pid=inc.pid, code=code, incarnation=inc.number,
            ran=round(ran, 3), signal=_signal_name(code),
        )  # fmt: skip
        if self._stopping:
            return
        evicted = await asyncio.to_thread(self._evict, ns.spec.id, inc)
        if evicted is not None:
            self.event("evicted", ns.spec.id, pid=inc.pid, epoch=evicted)
        if ran >= STABLE_AFTER:
            ns.failures = 0
        delay = BACKOFF[min(ns.failures, len(BACKOFF) - 1)]
        ns.failures += 1
        ns.next_start = time.monotonic() + delay
        if delay:
            self.event("restart_scheduled", ns.spec.id, delay=delay)

    def _balancer_routes_to_all(self) -> bool:
        """Whether the balancer routes to every node's current slot (HAProxy
        marks a server UP only after ``rise`` good checks; NGINX has no such
        state and routes at once)."""
        states = self._balancer.backend_states()
        for ns in self.nodes.values():
            cur = ns.current
            if cur is None:
                return False
            state = str(states.get(slot_name(ns.spec.id, cur.slot), "UP")).upper()
            if not state.startswith("UP"):
                return False
        return True

    def _evict(self, node: str, inc: Incarnation) -> int | None:
        """Remove a dead incarnation's claim if the coordinator still lists it
        (by pid): the process is reaped, so nobody can be acknowledging under it."""
        try:
            member = self._coordinator.members().get(node)
            if member is None or member.info.get("pid") != str(inc.pid):
                return None
            if self._coordinator.evict(node, member.epoch):
                return int(member.epoch)
        except KeepcountError as exc:  # its TTL removes it anyway
            log.warning("evicting %s: %s", node, exc)
        return None

    def _check_claim(self, ns: NodeState, inc: Incarnation, now: float) -> None:
        member = self.members.get(ns.spec.id)
        if member is not None and member.info.get("pid") == str(inc.pid):
            if not inc.claimed:
                inc.claimed = True
                inc.epoch = member.epoch
                self.event("claimed", ns.spec.id, pid=inc.pid, epoch=member.epoch)
            inc.absent_since = None
            return
        if not inc.claimed or self.members_at is None:
            return
        if inc.absent_since is None:
            inc.absent_since = now
        elif now - inc.absent_since >= ABSENT_GRACE:
            # Alive, but no longer the holder: paused past its TTL, or cut off.
            inc.stale = True
            inc.ready = False
            ns.stale.append(inc)
            ns.current = None
            ns.next_start = now
            holder = member.info.get("pid") if member is not None else None
            self.event(
                "claim_lost", ns.spec.id, pid=inc.pid, epoch=inc.epoch,
                state=process_state(inc.pid), holder_pid=holder,
            )  # fmt: skip

    def _start_node(self, ns: NodeState) -> None:
        spec = self.spec
        busy = {old.slot for old in ns.stale if old.exit_code is None}
        last = ns.current.slot if ns.current is not None else None
        free = [s for s in (0, 1) if s not in busy]
        if not free:  # two live old incarnations: the oldest has to go
            oldest = ns.stale[0]
            oldest.process.kill()
            with contextlib.suppress(Exception):
                oldest.process.wait(10)
            free = [oldest.slot]
        slot = last if last in free else free[0]
        ns.incarnations += 1
        if ns.incarnations > 1:
            ns.restarts += 1
        logs = spec.directory / "nodes"
        proc = NodeProcess(
            ns.spec.id,
            self.store_url,
            port=ns.spec.ports[slot],
            host=spec.host,
            log=logs / f"{slot_name(ns.spec.id, slot)}.log",
            extra=[
                "--coordinator", self.coordinator_url,
                "--claim-ttl", str(spec.claim_ttl),
                *spec.extra.get("node_args", []),
            ],
        )  # fmt: skip
        proc.start()
        if self.partitions is not None:  # before the child's Python opens a socket
            self.partitions.adopt(slot_name(ns.spec.id, slot), proc.pid)
        inc = Incarnation(ns.spec.id, ns.incarnations, slot, proc)
        ns.current = inc
        ns.next_start = None
        self.event(
            "started", ns.spec.id, pid=inc.pid, slot=slot_name(ns.spec.id, slot),
            incarnation=inc.number, port=ns.spec.ports[slot],
        )  # fmt: skip

    async def _probe(self, ns: NodeState) -> None:
        assert self._session is not None
        while not self._stopping:
            inc = ns.current
            if inc is None or inc.exit_code is not None:
                await asyncio.sleep(PROBE_EVERY)
                continue
            url = f"http://{self.spec.host}:{inc.process.port}/readyz"
            try:
                async with self._session.get(url) as resp:
                    body = await resp.json(content_type=None)
                    ok = resp.status == 200
            except (TimeoutError, aiohttp.ClientError, ValueError) as exc:
                ok, body = False, {}
                inc.probe = (
                    "unresponsive" if isinstance(exc, TimeoutError) or inc.probe != "starting"
                    else "starting"
                )  # fmt: skip
            else:
                inc.probe = "ready" if ok else "restoring"
            if ok:
                inc.readyz = body
                if not inc.ready:
                    inc.ready = True
                    first = inc.ready_at is None
                    inc.ready_at = time.monotonic()
                    self.event(
                        "ready", ns.spec.id, pid=inc.pid, epoch=body.get("epoch"),
                        incarnation=inc.number, first=first,
                        after=round(inc.ready_at - inc.started_mono, 3),
                        restored_series=body.get("restored_series"),
                        restore_seconds=body.get("restore_seconds"),
                        restoring_since=body.get("restoring_since"),
                        ready_at=body.get("ready_at"),
                    )  # fmt: skip
            elif inc.ready and inc is ns.current:
                inc.ready = False
                self.event("unready", ns.spec.id, pid=inc.pid, probe=inc.probe)
            await asyncio.sleep(PROBE_EVERY)

    # -- fault verbs (return once their effect is seen) --------------------------

    def _state(self, node: str) -> NodeState:
        ns = self.nodes.get(node)
        if ns is None:
            raise InvalidInput(f"no node {node!r} in this cluster (nodes: {', '.join(self.nodes)})")
        return ns

    async def signal(
        self, node: str, name: str, timeout: float = 10.0, *, clean: bool = False
    ) -> dict[str, Any]:
        """Send SIGKILL / SIGSTOP / SIGCONT / SIGTERM to a node's process.

        CONT goes to the node's paused processes (a replaced old incarnation
        included: that is how a zombie is woken); the others go to the
        current incarnation.  Returns once the kernel shows the effect
        (killed: reaped by the detector; stopped: state T; continued: not T).

        ``clean`` (STOP on an SQLite store): stop the process at a moment it
        holds no write lock on the file.  SQLite has one writer at a time: a
        node paused in the middle of a write holds that lock, and every node
        sharing the file waits until it runs again or dies (a real limit of
        the embedded store, see the README; a distributed store has none).
        A fault meant to show fencing, not that stall, asks for ``clean``.
        """
        sig = SIGNALS.get(name.upper().removeprefix("SIG"))
        if sig is None:
            raise InvalidInput(f"unknown signal {name!r}: choose one of {sorted(SIGNALS)}")
        ns = self._state(node)
        if sig == signal.SIGCONT:
            targets = [i for i in (ns.current, *ns.stale) if i and process_state(i.pid) == "T"]
        else:
            targets = [ns.current] if ns.current is not None else []
        if not targets:
            raise InvalidInput(f"node {node} has no process to send SIG{name.upper()} to")
        pids = [t.pid for t in targets]
        attempts = 1
        for t in targets:
            os.kill(t.pid, sig)
            if sig == signal.SIGSTOP and clean:
                attempts = await self._stop_outside_writes(t)
        self.event(
            "signal", node, signal=f"SIG{name.upper().removeprefix('SIG')}", pids=pids,
            **({"attempts": attempts} if attempts > 1 else {}),
        )  # fmt: skip
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            states = [process_state(t.pid) for t in targets]
            if sig == signal.SIGSTOP and all(s == "T" for s in states):
                break
            if sig == signal.SIGCONT and all(s != "T" for s in states):
                break
            if sig in (signal.SIGKILL, signal.SIGTERM) and all(
                t.exit_code is not None for t in targets
            ):
                break
            await asyncio.sleep(0.005)
        else:
            raise TimeoutError(f"SIG{name} to {node} (pids {pids}) showed no effect in {timeout} s")
        return {"node": node, "signal": name.upper(), "pids": pids}

    async def _stop_outside_writes(self, inc: Incarnation) -> int:
        """Re-stop ``inc`` until it is stopped holding no lock on the store file."""
        if not self.store_url.startswith("sqlite:"):
            return 1
        from keepcount.stores import sqlite_path

        db = Path(sqlite_path(self.store_url))
        paths = [db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")]
        for attempt in range(1, 1001):
            while process_state(inc.pid) not in ("T", None):
                await asyncio.sleep(0.001)
            if not holds_write_lock(inc.pid, paths):
                return attempt
            os.kill(inc.pid, signal.SIGCONT)
            await asyncio.sleep(0.003)  # let it finish its write
            os.kill(inc.pid, signal.SIGSTOP)
        raise TimeoutError(f"{inc.node} (pid {inc.pid}) never stopped outside a write")

    async def restart(self, node: str) -> dict[str, Any]:
        """Stop the node gracefully (SIGTERM) and let the detector start a new
        incarnation; returns once that one is ready."""
        ns = self._state(node)
        before = ns.incarnations
        if ns.current is not None:
            await self.signal(node, "TERM", timeout=STOP_GRACE)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            cur = ns.current
            if ns.incarnations > before and cur is not None and cur.ready:
                return {"node": node, "pid": cur.pid, "incarnation": cur.number}
            await asyncio.sleep(0.02)
        raise TimeoutError(f"{node} was not ready again within 60 s")

    # -- status ------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        now = time.monotonic()
        nodes = []
        for ns in self.nodes.values():
            cur = ns.current
            entry: dict[str, Any] = {
                "id": ns.spec.id,
                "state": cur.state() if cur is not None else "down",
                "restarts": ns.restarts,
                "incarnations": ns.incarnations,
                "stale": [
                    {"pid": o.pid, "slot": slot_name(ns.spec.id, o.slot), "state": o.state()}
                    for o in ns.stale
                ],
            }
            if cur is not None:
                entry.update(
                    pid=cur.pid,
                    slot=slot_name(ns.spec.id, cur.slot),
                    url=cur.process.url,
                    epoch=cur.epoch,
                    incarnation=cur.number,
                    uptime=round(now - cur.started_mono, 3),
                    ready=cur.ready,
                    restored_series=cur.readyz.get("restored_series"),
                )
            nodes.append(entry)
        lb: dict[str, Any] = {"kind": self.spec.lb, "url": self.spec.lb_url}
        if self._balancer is not None:
            try:
                lb["backends"] = self._balancer.backend_states()
            except Exception as exc:  # a status page must not fail on it
                lb["error"] = str(exc)
        return {
            "directory": str(self.spec.directory),
            "store": self.store_url,
            "coordinator": {"kind": self.spec.coordinator, "url": self.coordinator_url},
            "lb": lb,
            "api": self.spec.api_url,
            "ready": self.ready.is_set(),
            "uptime": round(time.time() - self.started, 3),
            "nodes": nodes,
            "members": {
                k: {"epoch": m.epoch, "pid": m.info.get("pid")} for k, m in self.members.items()
            },
        }

    async def counters(self) -> dict[str, Any] | None:
        """The cluster totals as any ready node answers them (None if none is)."""
        assert self._session is not None
        for ns in self.nodes.values():
            inc = ns.current
            if inc is None or not inc.ready:
                continue
            url = f"http://{self.spec.host}:{inc.process.port}/v1/cluster/counters"
            try:
                async with self._session.get(url, timeout=aiohttp.ClientTimeout(total=5)) as r:
                    if r.status == 200:
                        data: dict[str, Any] = await r.json()
                        return data
            except (TimeoutError, aiohttp.ClientError):
                continue
        return None

    # -- teardown ----------------------------------------------------------------

    async def _teardown(self) -> None:
        incs = [i for ns in self.nodes.values() for i in (ns.current, *ns.stale) if i is not None]
        for inc in incs:
            if process_state(inc.pid) == "T":
                with contextlib.suppress(ProcessLookupError):
                    os.kill(inc.pid, signal.SIGCONT)
            inc.process.terminate()
        deadline = time.monotonic() + STOP_GRACE
        for inc in incs:
            while inc.process.proc is not None and inc.process.proc.poll() is None:
                if time.monotonic() > deadline:
                    inc.process.kill()
                    await asyncio.to_thread(inc.process.wait, 10)
                    break
                await asyncio.sleep(0.02)
            if inc.process.proc is not None:
                inc.exit_code = inc.process.proc.returncode
        if self._session is not None:
            await self._session.close()
        await asyncio.to_thread(self._stop_servers)

    def _stop_servers(self) -> None:
        steps = [
            ("watch", self._watch, "cancel"),
            ("coordinator client", self._coordinator, "close"),
            ("load balancer", self._balancer, "stop"),
            ("coordinator", self._servers, "stop"),
            ("store", self.store_servers, "stop"),
        ]
        for what, obj, method in steps:
            if obj is None:  # never started
                continue
            try:
                getattr(obj, method)()
            except Exception as exc:
                log.warning("stopping the %s: %s", what, exc)


def _signal_name(code: int) -> str | None:
    if code >= 0:
        return None
    try:
        return signal.Signals(-code).name
    except ValueError:
        return None


def read_events(directory: Path) -> list[dict[str, Any]]:
    """Every event a supervisor of ``directory`` recorded, in order."""
    path = directory / EVENTS_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
