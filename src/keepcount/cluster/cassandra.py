"""A local Apache Cassandra cluster (1 to 3 nodes) as child processes.

The real server (``scripts/get-cassandra.sh`` installs Cassandra 5.0 from
Maven Central into keepcount's cache), started as plain ``java`` processes
with ``org.apache.cassandra.service.CassandraDaemon`` and a generated
``cassandra.yaml`` per node, never as a system service.  Node ``i`` listens
on ``127.0.0.(i+1)`` (all of 127/8 is loopback on Linux), with one native
(CQL) port and one storage (gossip) port, each free on every node's address,
and a JMX port of its own bound to 127.0.0.1 only (``nodetool -p PORT``).
Its config, data, commitlog, hints, saved caches and logs live under
``directory/node{i}``.

Every verb returns only after its effect is observed:

- ``start`` / ``restart``: once CQL answers on every live node and every live
  node sees every live node UP in the ring (``wait_up``);
- ``kill`` / ``stop``: once the process is reaped (SIGKILL: nothing here
  needs a clean shutdown, and a dead node is what a crash looks like);
- ``pause`` / ``resume``: once ``/proc`` shows it stopped / running again;
- ``wait_down``: once every other live node's failure detector has marked
  the nodes that are not live DOWN (a QUORUM write is then refused as
  *Unavailable* instead of timing out).

"UP as seen by node j" is checked from j itself (``CqlConnection``: a
driver session pinned to j): j's ``system.peers_v2`` lists every
other node (it knows their tokens), and a read of ``system_distributed``
(replicated to every node: RF 3) at a consistency level equal to the number
of live nodes succeeds with j as coordinator.  A coordinator only sends to
replicas its failure detector holds alive, so the read can succeed only if
j holds every live node UP and each of them answered.

Durability (DESIGN G1): ``commitlog_sync: batch`` (or ``group`` with a 2 ms
window), so a write is acknowledged only after its commitlog segment was
fsynced, never the ``periodic`` default that acknowledges before the sync
(``keepcount.cluster.cassandra_config`` renders the config; ``keepcount.cluster.cql``
is the probe's session).

Example::

    cluster = CassandraCluster(tmp_path / "cassandra", nodes=3)
    cluster.start()                       # ~12-16 s for 3 nodes on 2 cores, ~5 s for 1
    url = cluster.url_for("counters")     # cassandra://127.0.0.1:P,127.0.0.2:P,.../counters
    cluster.kill(1)                       # SIGKILL node 1 and reap it
    cluster.restart(1)                    # same data dir; UP again as seen by the others
    cluster.stop()

Not thread-safe: one owner (a test fixture, the cluster CLI) drives it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, Self

from keepcount.cluster.cassandra_config import (
    DEFAULT_HEAP_MB,
    INSTALL_HINT,
    NodeSettings,
    cassandra_home,
    java_binary,
    node_argv,
    nodetool_argv,
    write_config,
)
from keepcount.cluster.cql import CqlConnection, CqlError
from keepcount.cluster.processes import (
    ServerGroup,
    ServerProcess,
    check_ports_free,
    process_state,
    saved_identity,
)
from keepcount.nodeproc import free_port
from keepcount.process import poll_until

__all__ = [
    "INSTALL_HINT",
    "CassandraCluster",
    "CassandraNode",
    "CqlConnection",
    "CqlError",
    "cassandra_home",
]

MAX_NODES = 3
"""The up check reads ``system_distributed`` (RF 3): with more nodes a
replica set would no longer cover every node."""

_MURMUR3_MIN = -(2**63)

_POLL = 0.2
"""Poll interval inside deadline loops (a probe is a few CQL round trips on
each node; not a synchronisation sleep)."""


# -- one node -------------------------------------------------------------------


class CassandraNode(ServerProcess):
    """One Cassandra node process; its address, ports and directories outlive
    the process, so a restart finds its data (and its token) again."""

    kind = "Cassandra node"

    def __init__(
        self,
        index: int,
        directory: Path,
        host: str,
        native_port: int,
        jmx_port: int,
        token: int,
        home: Path,
    ) -> None:
        self.home_dir = directory / f"node{index}"
        (self.home_dir / "logs").mkdir(parents=True, exist_ok=True)
        super().__init__(f"node{index}", self.home_dir / "logs" / "cassandra.log")
        self.index = index
        self.host = host
        self.native_port = native_port
        self.jmx_port = jmx_port
        self.token = token
        """Its token on first start (``num_tokens: 1``); later starts read
        the saved one from its system tables."""
        self.cassandra_home = home

    @property
    def conf_dir(self) -> Path:
        return self.home_dir / "conf"

    def write_config(self, s: NodeSettings) -> None:
        """``cassandra.yaml`` and ``logback.xml`` in ``conf_dir``
        (``keepcount.cluster.cassandra_config.write_config``)."""
        write_config(self.home_dir, self.host, self.token, s)

    def argv(self, s: NodeSettings, java: str) -> list[str]:
        return node_argv(self.home_dir, self.cassandra_home, self.jmx_port, s, java)

    def start(self, s: NodeSettings, java: str, note: str = "") -> None:
        """Write its config and start it."""
        self.write_config(s)
        (self.conf_dir / "triggers").mkdir(exist_ok=True)
        self.spawn(self.argv(s, java), note)

    @property
    def address(self) -> str:
        return self.host

    def live(self) -> bool:
        """Running and not stopped (a paused node is not live)."""
        return self.running() and process_state(self.pid) not in ("T", "t", None)

    def connect(self, timeout: float = 2.0) -> CqlConnection:
        """A native-protocol connection to this node; ``OSError`` if it does
        not answer."""
        return CqlConnection(self.host, self.native_port, timeout)

    def answers(self, timeout: float = 1.0) -> bool:
        """True if CQL answers a read of ``system.local``."""
        try:
            with self.connect(timeout) as c:
                c.query("SELECT key FROM system.local")
        except (OSError, CqlError, ValueError):
            return False
        return True


# -- the cluster ----------------------------------------------------------------


IDENTITY_FILE = "keepcount-cassandra.json"
"""In a local cluster's directory: its name, size and ports."""


def _free_port_on(hosts: Sequence[str], avoid: set[int]) -> int:
    """A TCP port nothing listens on at any of ``hosts`` right now."""
    for _ in range(100):
        port = free_port(hosts[0])
        if port in avoid:
            continue
        try:
            for host in hosts[1:]:
                with socket.socket() as s:
                    s.bind((host, port))
        except OSError:
            continue
        return port
    raise OSError(f"no TCP port free on all of {list(hosts)}")


class CassandraCluster(ServerGroup[CassandraNode]):
    """A Cassandra cluster of ``nodes`` (1 to 3) processes; see the module docstring.

    ``home``: the install (default: ``cassandra_home()``).  ``ports``:
    (native, storage) shared by every node, each on its own address; by
    default ports free on all of them (so concurrent test sessions never
    collide).  ``heap_mb``: ``-Xmx`` per node.  ``commitlog_sync``:
    ``"batch"`` (fsync before each acknowledgement; concurrent writes share
    an fsync) or ``"group"`` (a 2 ms window); never ``periodic`` (G1).
    ``jvm_options`` are appended to the JVM's flags (e.g. to compile with C2
    for a benchmark: ``["-XX:TieredStopAtLevel=4"]``).  ``kill``, ``pause``,
    ``resume``, ``stop``, ``logs``: ``ServerGroup`` (``resume`` returns once
    the node runs, not once the others hold it UP again: see ``wait_up``).
    """

    label = "Cassandra"
    stop_timeout = 30.0

    def __init__(
        self,
        directory: Path,
        nodes: int = 1,
        *,
        home: Path | None = None,
        ports: tuple[int, int] | None = None,
        heap_mb: int = DEFAULT_HEAP_MB,
        commitlog_sync: Literal["batch", "group"] = "batch",
        cluster_name: str | None = None,
        jvm_options: Sequence[str] = (),
    ) -> None:
        if not 1 <= nodes <= MAX_NODES:
            raise ValueError(f"a local Cassandra cluster has 1 to {MAX_NODES} nodes, not {nodes}")
        if commitlog_sync not in ("batch", "group"):
            raise ValueError("commitlog_sync must be 'batch' or 'group' (never 'periodic': G1)")
        self.home = cassandra_home(home)
        java = java_binary()
        assert java is not None  # cassandra_home checked it
        self.java = java
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        hosts = [f"127.0.0.{i + 1}" for i in range(nodes)]

        def fresh() -> dict[str, Any]:
            if ports is None:
                native = _free_port_on(hosts, set())
                storage = _free_port_on(hosts, {native})
            else:
                native, storage = ports
            return {
                "cluster_name": cluster_name or f"keepcount-{os.getpid()}-{native}",
                "nodes": nodes,
                "native_port": native,
                "storage_port": storage,
            }

        # A data directory belongs to one cluster: Cassandra refuses data
        # saved under another cluster name, and its peers are known by port.
        identity = self.directory / IDENTITY_FILE
        existed = identity.exists()
        asked = {
            "cluster_name": cluster_name,
            "nodes": nodes,
            "native_port": ports[0] if ports else None,
            "storage_port": ports[1] if ports else None,
        }
        saved = saved_identity(identity, "a Cassandra cluster", asked, fresh)
        self.port, self.storage_port = saved["native_port"], saved["storage_port"]
        cluster_name = saved["cluster_name"]
        if existed:
            check_ports_free(
                [(h, p) for h in hosts for p in (self.port, self.storage_port)], self.directory
            )
        jmx_ports: list[int] = []
        for _ in hosts:
            jmx_ports.append(
                _free_port_on(["127.0.0.1"], {self.port, self.storage_port, *jmx_ports})
            )
        step = 2**64 // nodes
        self.nodes = [
            CassandraNode(
                i, self.directory, host, self.port, jmx_ports[i], _MURMUR3_MIN + i * step, self.home
            )
            for i, host in enumerate(hosts)
        ]
        self.members = self.nodes
        self.settings = NodeSettings(
            cluster_name=cluster_name,
            seeds=",".join(f"{h}:{self.storage_port}" for h in hosts),
            native_port=self.port,
            storage_port=self.storage_port,
            heap_mb=heap_mb,
            commitlog_sync=commitlog_sync,
            jvm_options=tuple(jvm_options),
        )
        self.started = False
        self.start_seconds: float | None = None
        """How long the last ``start()`` took (measured, for reports)."""

    # -- addresses ---------------------------------------------------------

    @property
    def hosts(self) -> list[str]:
        """Every node's address (``127.0.0.1``, ``127.0.0.2``, ...)."""
        return [n.host for n in self.nodes]

    @property
    def contact_points(self) -> list[tuple[str, int]]:
        """(address, native port) of every node, as ``cassandra-driver``'s
        ``Cluster(contact_points=...)`` takes them."""
        return [(n.host, self.port) for n in self.nodes]

    @property
    def endpoints(self) -> list[str]:
        """``host:port`` of every node (the port omitted when it is 9042)."""
        return [h if self.port == 9042 else f"{h}:{self.port}" for h in self.hosts]

    def url_for(self, keyspace: str, *, first: int | None = None) -> str:
        """The store URL ``cassandra://host:port,host:port,.../keyspace``;
        ``first`` lists that node first."""
        endpoints = self.endpoints
        if first is not None:
            endpoints = endpoints[first:] + endpoints[:first]
        return f"cassandra://{','.join(endpoints)}/{keyspace}"

    # -- lifecycle ---------------------------------------------------------

    def start(self, timeout: float = 240.0) -> Self:
        """Start every node that is not running, all at once, and return
        once all are UP as seen by each other (``wait_up``); the time it took
        is in ``start_seconds``.  On failure the nodes this call started are
        killed again (their logs stay) and the error names their log tails."""
        began = time.monotonic()
        note = " (restart)" if self.started else " (new)"
        spawned = [n for n in self.nodes if not n.running()]
        try:
            for n in spawned:
                n.start(self.settings, self.java, note)
            self.started = True
            self.wait_up(timeout)
        except BaseException:
            for n in spawned:
                n.kill()
            raise
        self.start_seconds = time.monotonic() - began
        return self

    def live(self) -> list[int]:
        """Indices of nodes that run and are not paused."""
        return [i for i, n in enumerate(self.nodes) if n.live()]

    def wait_up(self, timeout: float = 240.0) -> None:
        """Return once CQL answers on every live node and each of them holds
        every live node UP and knows every node's token; ``TimeoutError``
        with the logs' tails otherwise, ``RuntimeError`` at once if a node's
        process exits by itself (a bad config, a port taken)."""
        deadline = time.monotonic() + timeout
        pending: list[int] = []

        def all_up() -> bool:
            self._check_exits()
            live = self.live()
            pending[:] = [i for i in live if not self._sees_up(i, live, deadline)]
            return not pending

        try:
            poll_until(all_up, timeout, "Cassandra nodes", interval=_POLL)
        except TimeoutError:
            names = [self.nodes[i].name for i in pending]
            raise TimeoutError(
                f"Cassandra nodes {names} not UP with their peers within {timeout} s\n{self.logs()}"
            ) from None

    def _sees_up(self, i: int, live: list[int], deadline: float) -> bool:
        """Node ``i`` lists every other node in ``system.peers_v2`` and a
        read at CL = number of live nodes succeeds with it as coordinator
        (the module docstring says why that means UP)."""
        node = self.nodes[i]
        others = {n.host for n in self.nodes if n is not node}
        consistency = ("ONE", "TWO", "THREE")[len(live) - 1]
        # Longer than the server's own read timeout (5 s), so a read that
        # waits on a replica fails on the server's side, not ours.
        timeout = max(0.5, min(6.0, deadline - time.monotonic()))
        try:
            with node.connect(timeout) as c:
                peers = c.query("SELECT peer, host_id FROM system.peers_v2")
                known = {p["peer"] for p in peers if p["host_id"] is not None}
                if not others <= known:
                    return False
                c.query(_PROBE, consistency)
        except (OSError, CqlError, ValueError):
            return False
        return True

    def alive_seen_by(self, i: int, timeout: float = 6.0) -> int | None:
        """How many nodes (itself included) node ``i``'s failure detector
        holds alive, from a read at CL ALL with ``i`` as coordinator: all of
        them if it succeeds, the count of an *Unavailable* answer otherwise;
        None if that cannot be told within ``timeout`` (no answer, or a
        replica it holds alive did not answer)."""
        try:
            with self.nodes[i].connect(timeout) as c:
                c.query(_PROBE, "ALL")
        except CqlError as exc:
            return exc.alive if exc.unavailable else None
        except (OSError, ValueError):
            return None
        return len(self.nodes)

    def wait_down(self, i: int, timeout: float = 60.0) -> None:
        """Node ``i`` was killed or paused: return once every live node's
        failure detector holds exactly the live nodes alive, so a request
        that needs more replicas is refused at once as *Unavailable* instead
        of timing out.  Takes ~10 s after the node fell silent (see
        ``PHI_CONVICT_THRESHOLD``)."""
        if self.nodes[i].live():
            raise RuntimeError(f"Cassandra {self.nodes[i].name} is live; kill or pause it first")

        def convicted() -> bool:
            live = self.live()
            # Short probes: before the conviction a CL ALL read waits the
            # server's whole read timeout; after it, Unavailable is instant.
            return all(self.alive_seen_by(j, timeout=1.0) == len(live) for j in live)

        try:
            poll_until(convicted, timeout, f"Cassandra {self.nodes[i].name} DOWN", interval=_POLL)
        except TimeoutError:
            raise TimeoutError(
                f"Cassandra {self.nodes[i].name} not DOWN as seen by the others "
                f"within {timeout} s\n{self.logs()}"
            ) from None

    def _check_exits(self) -> None:
        """``RuntimeError`` with the logs if a node exited other than by our
        SIGKILL."""
        for n in self.nodes:
            code = n.returncode
            if code is not None and code != -signal.SIGKILL:
                raise RuntimeError(f"Cassandra {n.name} exited with {code}\n{self.logs()}")

    def restart(self, i: int, timeout: float = 180.0) -> None:
        """Kill node ``i`` if it runs, start it again on the same data dir
        (its commitlog replays; its token comes from its system tables) and
        return once it and every other live node hold each other UP."""
        node = self.nodes[i]
        node.kill()
        node.start(self.settings, self.java, " (restart)")
        self.wait_up(timeout)

    def nodetool(self, i: int, *args: str, timeout: float = 60.0) -> str:
        """Run Cassandra's ``nodetool`` against node ``i`` over its JMX port
        (e.g. ``nodetool(0, "status")``); its output.  A JVM of its own
        (~1-2 s of CPU): for diagnostics, not for polling."""
        node = self.nodes[i]
        argv = nodetool_argv(self.java, self.home, node.conf_dir, node.jmx_port, *args)
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            raise RuntimeError(
                f"nodetool {' '.join(args)} on {self.nodes[i].name} exited with "
                f"{done.returncode}: {done.stdout[-2000:]}{done.stderr[-2000:]}"
            )
        return done.stdout


_PROBE = (
    "SELECT status FROM system_distributed.view_build_status "
    "WHERE keyspace_name = 'keepcount_probe' AND view_name = 'probe'"
)
"""A one-partition read of a table replicated to every node (RF 3); the row
never exists, so the read costs each replica next to nothing."""
