"""The supervisor of a local cluster: its servers, its nodes, its fault verbs.

One asyncio program (``keepcount cluster supervise``, started in the
background by ``keepcount cluster up``; ``keepcount demo`` runs one in
process) that:

1. starts the store's servers if the spec asks for local ones (Cassandra,
   the Bigtable emulator), the coordinator (etcd as 3 members, or ZooKeeper
   standalone) and the load balancer (HAProxy or NGINX, listing both slots
   of every node), all on 127.0.0.1 with data and logs under the cluster
   directory;
2. starts one ``keepcount node`` process per node id, with
   ``--coordinator`` so each claims its id with a lease and a fencing epoch
   (``keepcount.cluster.launcher``: incarnations, slots, restart backoff);
3. runs the **failure detector** (``keepcount.cluster.detector``): exits
   awaited, claims watched, ``/readyz`` probed, failed nodes restarted;
4. serves a small control API on ``spec.api_port`` (``keepcount.cluster.api``:
   status, signal a node, restart a node, tear everything down) for the CLI.

Every event (started, ready, exited, claim lost, evicted, ...) is appended to
``<dir>/events.jsonl`` (``keepcount.cluster.events``): the demo's report and
the failover measurements are read from it.

How production would run the same parts: see ``docs/cluster.md`` ("In
production"): systemd units (``Restart=always``) or Kubernetes
(a StatefulSet, readiness probe on ``/readyz``) take the supervisor's place;
the claim and fencing logic lives in the node, not here.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from keepcount import httpclient
from keepcount.cluster.balancer import Backend, LoadBalancer
from keepcount.cluster.bigtable import BigtableEmulator
from keepcount.cluster.cassandra import CassandraCluster
from keepcount.cluster.cassandra_config import WRITE_REQUEST_TIMEOUT
from keepcount.cluster.detector import FailureDetector
from keepcount.cluster.etcd import EtcdCluster
from keepcount.cluster.events import EVENTS_FILE, Event, EventLog, read_events
from keepcount.cluster.launcher import BACKOFF, Incarnation, Launcher, NodeState
from keepcount.cluster.partition import Partitions
from keepcount.cluster.spec import ClusterSpec, slot_name
from keepcount.cluster.zookeeper import ZooKeeperServer
from keepcount.coordination.base import Coordinator, Member, Watch
from keepcount.errors import InvalidInput
from keepcount.process import apoll_until, process_state

__all__ = [
    "BACKOFF",
    "EVENTS_FILE",
    "Incarnation",
    "NodeState",
    "Supervisor",
    "answer_timeout",
    "process_state",
    "read_events",
]

log = logging.getLogger("keepcount.cluster")

STOP_GRACE = 15.0
"""Seconds a node gets to stop after SIGTERM before it is killed."""
COUNTERS_TIMEOUT = 5.0
"""Seconds a ready node has to answer the cluster totals (``counters``)."""
SIGNALS = {"KILL": signal.SIGKILL, "STOP": signal.SIGSTOP, "CONT": signal.SIGCONT,
           "TERM": signal.SIGTERM}  # fmt: skip

CoordinatorServers = EtcdCluster | ZooKeeperServer
StoreServers = CassandraCluster | BigtableEmulator


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


def answer_timeout(store: str) -> float:
    """Seconds the load balancer waits for a node's answer before resending
    the request (a keyed one) to another node: 1 s, so a paused node's
    requests move on quickly, but never less than a flush may take while
    the store waits out its own write timeout.

    Cassandra answers a write (and a lightweight transaction) that a replica
    did not acknowledge after ``write_request_timeout`` (2 s by default).
    While a SIGKILLed replica is not yet convicted (~10 s), a contended
    Paxos round waits that long for it; a balancer that gives up after 1 s
    resends the flush's keyed requests while their first attempts still
    run, the two attempts' rounds on each key contend, and each loser waits
    2 s more: in issue 18's CI one acknowledgement waited 10.6 s.  So on
    Cassandra the balancer waits 2.5 s; a paused node is still marked DOWN
    by its health checks within ~1 s, so only the requests already in flight
    to it wait longer.
    """
    if store == "cassandra" or store.startswith("cassandra://"):
        return WRITE_REQUEST_TIMEOUT + 0.5
    return 1.0


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
        on_event: Callable[[Event], None] | None = None,
        api: bool = True,
    ) -> None:
        self.spec = spec
        self.event_log = EventLog(spec.directory / EVENTS_FILE, on_event)
        self.nodes = {n.id: NodeState(n) for n in spec.nodes}
        self.launcher = Launcher(spec, self.event_log)
        self.ready = asyncio.Event()
        """Set once every node was ready at least once after start-up."""
        self.detector = FailureDetector(self.nodes, self.launcher, self.event_log, self.ready)
        self.store_servers: StoreServers | None = None
        """The local store servers the spec asks for (``store = "cassandra"`` /
        ``"bigtable"``), for fault verbs; None for a store URL."""
        self.started = time.time()
        self.failed: str | None = None
        self._api = api
        self._stopping = False
        self._stopped = asyncio.Event()
        self._servers: CoordinatorServers | None = None
        self._balancer: LoadBalancer | None = None
        self._coordinator: Coordinator | None = None
        self._watch: Watch | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- what the API, the faults and the tests read ------------------------------

    @property
    def events(self) -> deque[Event]:
        """The latest events (``keepcount.cluster.events.EventLog``)."""
        return self.event_log.events

    @property
    def event_count(self) -> int:
        return self.event_log.count

    def event(self, what: str, node: str | None = None, **data: Any) -> Event:
        """Record an event (see ``keepcount.cluster.events``)."""
        return self.event_log.append(what, node, **data)

    @property
    def members(self) -> dict[str, Member]:
        """The coordinator's membership as last seen by its watch."""
        return self.detector.members

    @property
    def store_url(self) -> str:
        """The store the nodes use: ``spec.store``, or the URL of the local
        servers when the spec asks for them (``cassandra``, ``bigtable``)."""
        return self.launcher.store_url

    @property
    def coordinator_url(self) -> str:
        return self.launcher.coordinator_url

    @property
    def partitions(self) -> Partitions | None:
        """``keepcount.cluster.partition.Partitions``, if set before ``run()``:
        every node process is put in its slot's cgroup at spawn, so that a
        nemesis can cut it off the network."""
        return self.launcher.partitions

    @partitions.setter
    def partitions(self, value: Partitions | None) -> None:
        self.launcher.partitions = value

    @property
    def balancer(self) -> LoadBalancer:
        """The load balancer (once started)."""
        if self._balancer is None:
            raise RuntimeError("the load balancer is not started")
        return self._balancer

    @property
    def servers(self) -> CoordinatorServers:
        """The coordinator's servers (``EtcdCluster`` / ``ZooKeeperServer``): fault verbs."""
        if self._servers is None:
            raise RuntimeError("the coordinator is not started")
        return self._servers

    # -- running -----------------------------------------------------------------

    async def run(self) -> None:
        """Start everything, supervise until ``stop()``, tear everything down."""
        self._loop = asyncio.get_running_loop()
        spec = self.spec
        (spec.directory / "nodes").mkdir(parents=True, exist_ok=True)
        self.event_log.reset()
        self.event("cluster_starting", lb=spec.lb, coordinator=spec.coordinator, store=spec.store)
        api_task: asyncio.Task[None] | None = None
        try:
            await asyncio.to_thread(self._start_store)
            await asyncio.to_thread(self._start_coordinator)
            balancer = await asyncio.to_thread(self._start_balancer)
            if self._api:
                from keepcount.cluster.api import serve_api

                api_task = asyncio.create_task(serve_api(self), name="keepcount-cluster-api")
            detector = asyncio.create_task(self.detector.run(balancer), name="keepcount-detector")
            stopped = asyncio.create_task(self._stopped.wait())
            await asyncio.wait([detector, stopped], return_when=asyncio.FIRST_COMPLETED)
            self.detector.stopping = True
            for task in (detector, stopped):
                task.cancel()
            await asyncio.gather(detector, stopped, return_exceptions=True)
            failure = None if detector.cancelled() else detector.exception()
            if failure is not None:  # the detector failed (a node could not be started)
                raise failure
        except BaseException as exc:
            if not isinstance(exc, asyncio.CancelledError):
                self.failed = f"{type(exc).__name__}: {exc}"
                log.exception("cluster supervisor failed")
            raise
        finally:
            self._stopping = self.detector.stopping = True
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

    def _start_store(self) -> None:
        """Start the local store servers the spec asks for, if it does, and
        create the store's schema once, before the nodes start (concurrent
        schema changes from several clients can conflict in Cassandra 5.0)."""
        spec = self.spec
        started = time.monotonic()
        servers: StoreServers | None = None
        kind = spec.store
        if spec.store == "cassandra":
            servers = CassandraCluster(spec.directory / "cassandra", nodes=3)
        elif spec.store == "bigtable":
            servers = BigtableEmulator(spec.directory / "bigtable")
            kind = "bigtable-emulator"
        if servers is not None:
            self.store_servers = servers
            servers.start()
            self.launcher.store_url = servers.url_for("keepcount")
            seconds = round(time.monotonic() - started, 3) if kind == "cassandra" else 0
            self.event("store_ready", kind=kind, url=self.store_url, seconds=seconds)
        if not self.store_url.startswith("sqlite:"):
            from keepcount.stores import open_store

            open_store(self.store_url).close()

    def _start_coordinator(self) -> None:
        from keepcount.coordination import open_coordinator

        spec = self.spec
        directory = spec.directory / spec.coordinator
        started = time.monotonic()
        servers: CoordinatorServers
        if spec.coordinator == "etcd":
            servers = EtcdCluster(directory, members=3)
        else:
            servers = ZooKeeperServer(directory)
        servers.start()
        self._servers = servers
        self.launcher.coordinator_url = servers.url_for("keepcount")
        self._coordinator = open_coordinator(self.coordinator_url)
        assert self._loop is not None
        self._watch = self.detector.watch(self._coordinator, self._loop)
        self.event(
            "coordinator_ready",
            kind=spec.coordinator,
            url=self.coordinator_url,
            seconds=round(time.monotonic() - started, 3),
        )

    def _start_balancer(self) -> LoadBalancer:
        from keepcount.cluster.balancers import make_balancer

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
        wait = answer_timeout(spec.store)
        opts: dict[str, Any] = (
            {"server_timeout": wait, "check_timeout": 0.3}
            if spec.lb == "haproxy"
            else {"read_timeout": wait, "send_timeout": wait}
        )
        lb = make_balancer(
            spec.lb, spec.directory / spec.lb, (spec.host, spec.lb_port), backends, **opts
        )
        self._balancer = lb
        lb.start()
        lb.wait_ready(30)
        self.event(
            "balancer_ready",
            kind=spec.lb,
            url=spec.lb_url,
            seconds=round(time.monotonic() - started, 3),
        )
        return lb

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
        the embedded store, see ``docs/stores.md``; a distributed store has none).
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
            t.process.signal(sig)
            if sig == signal.SIGSTOP and clean:
                attempts = await self._stop_outside_writes(t)
        self.event(
            "signal", node, signal=f"SIG{name.upper().removeprefix('SIG')}", pids=pids,
            **({"attempts": attempts} if attempts > 1 else {}),
        )  # fmt: skip

        def seen() -> bool:
            states = [process_state(t.pid) for t in targets]
            if sig == signal.SIGSTOP:
                return all(s == "T" for s in states)
            if sig == signal.SIGCONT:
                return all(s != "T" for s in states)
            return all(t.exit_code is not None for t in targets)  # recorded by the detector

        try:
            await apoll_until(seen, timeout, f"SIG{name} to {node}", interval=0.005)
        except TimeoutError:
            raise TimeoutError(
                f"SIG{name} to {node} (pids {pids}) showed no effect in {timeout} s"
            ) from None
        return {"node": node, "signal": name.upper(), "pids": pids}

    async def _stop_outside_writes(self, inc: Incarnation) -> int:
        """Re-stop ``inc`` until it is stopped holding no lock on the store file."""
        if not self.store_url.startswith("sqlite:"):
            return 1
        from keepcount.stores import sqlite_path

        db = Path(sqlite_path(self.store_url))
        paths = [db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")]
        attempts = 0

        async def stopped_outside_a_write() -> bool:
            nonlocal attempts
            attempts += 1
            await apoll_until(
                lambda: process_state(inc.pid) in ("T", None), 10, "stop", interval=0.001
            )
            if not holds_write_lock(inc.pid, paths):
                return True
            inc.process.signal(signal.SIGCONT)
            await asyncio.sleep(0.003)  # let it finish its write
            inc.process.signal(signal.SIGSTOP)
            return False

        try:
            await apoll_until(stopped_outside_a_write, 10.0, "stop", interval=0.0)
        except TimeoutError:
            raise TimeoutError(
                f"{inc.node} (pid {inc.pid}) never stopped outside a write in 10 s"
            ) from None
        return attempts

    async def restart(self, node: str) -> dict[str, Any]:
        """Stop the node gracefully (SIGTERM) and let the detector start a new
        incarnation; returns once that one is ready."""
        ns = self._state(node)
        before = ns.incarnations
        if ns.current is not None:
            await self.signal(node, "TERM", timeout=STOP_GRACE)

        def back() -> bool:
            cur = ns.current
            return ns.incarnations > before and cur is not None and cur.ready

        try:
            await apoll_until(back, 60, node, interval=0.02)
        except TimeoutError:
            raise TimeoutError(f"{node} was not ready again within 60 s") from None
        cur = ns.current
        assert cur is not None
        return {"node": node, "pid": cur.pid, "incarnation": cur.number}

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
        async with httpclient.new_session(timeout=COUNTERS_TIMEOUT) as session:
            for ns in self.nodes.values():
                inc = ns.current
                if inc is None or not inc.ready:
                    continue
                url = f"{inc.process.url}/v1/cluster/counters"
                try:
                    status, body = await httpclient.exchange(session, "GET", url)
                    if status == 200:
                        data: dict[str, Any] = json.loads(body)
                        return data
                except (OSError, ValueError):
                    continue
        return None

    # -- teardown ----------------------------------------------------------------

    async def _teardown(self) -> None:
        incs = [i for ns in self.nodes.values() for i in (ns.current, *ns.stale) if i is not None]
        for inc in incs:
            inc.process.terminate()  # SIGCONT first: a paused one must act on it
        deadline = time.monotonic() + STOP_GRACE
        for inc in incs:
            left = max(0.001, deadline - time.monotonic())
            try:
                inc.exit_code = await asyncio.wait_for(inc.process.exited(), left)
            except TimeoutError:
                inc.exit_code = await asyncio.to_thread(inc.process.kill)
        await asyncio.to_thread(self._stop_servers)

    def _stop_servers(self) -> None:
        steps: list[tuple[str, Callable[[], object] | None]] = [
            ("watch", self._watch.cancel if self._watch else None),
            ("coordinator client", self._coordinator.close if self._coordinator else None),
            ("load balancer", self._balancer.stop if self._balancer else None),
            ("coordinator", self._servers.stop if self._servers else None),
            ("store", self.store_servers.stop if self.store_servers else None),
        ]
        for what, stop in steps:
            if stop is None:  # never started
                continue
            try:
                stop()
            except Exception as exc:
                log.warning("stopping the %s: %s", what, exc)
