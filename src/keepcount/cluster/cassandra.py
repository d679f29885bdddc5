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
fsynced, never the ``periodic`` default that acknowledges before the sync.

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
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self

from keepcount.cluster.processes import (
    ServerProcess,
    check_ports_free,
    process_state,
    saved_identity,
)
from keepcount.nodeproc import free_port

__all__ = [
    "INSTALL_HINT",
    "CassandraCluster",
    "CassandraNode",
    "CqlConnection",
    "CqlError",
    "cassandra_home",
]

INSTALL_HINT = "scripts/get-cassandra.sh"
"""The command that installs Cassandra where ``cassandra_home`` looks."""

HOME_ENV = "KEEPCOUNT_CASSANDRA_HOME"
CACHE_ENV = "KEEPCOUNT_CACHE"

MAX_NODES = 3
"""The up check reads ``system_distributed`` (RF 3): with more nodes a
replica set would no longer cover every node."""

DEFAULT_HEAP_MB = 512
"""Maximum heap per node.  Enough for test and demo loads (memtables get 1/4
of it); three nodes plus the rest of a test run fit a small shared machine."""

INITIAL_HEAP_MB = 128
"""``-Xms``: Cassandra mlockall()s its memory at start-up (it succeeds as
root), which commits all of an ``-Xms`` = ``-Xmx`` heap at once: a 512 MiB
initial heap made each node ~1 GB resident; 128 MiB makes it ~600 MB and
the heap grows when it needs to."""

PHI_CONVICT_THRESHOLD = 5
"""The failure detector's threshold (Cassandra allows 5-16, default 8).  A
killed or paused node is marked DOWN after ~10 s instead of ~20-25 s, so
tests of a lost replica do not wait half a minute; a false conviction still
needs ~10 s without any gossip from a node, which a loaded machine does not
produce."""

GROUP_WINDOW_MS = 2
"""``commitlog_sync: group`` window: an acknowledged write waits at most this
long for the fsync that covers it, and concurrent writes share one fsync."""

_MURMUR3_MIN = -(2**63)

# JVM flags of Cassandra 5.0's conf/jvm-server.options and jvm17-server.options
# that a JDK 17 needs to run it at all (module access for its off-heap and
# agent code, netty's direct buffers), without the ones that only pay off on
# big machines (AlwaysPreTouch, NUMA, large G1 regions, heap dumps).
_JDK17_MODULE_FLAGS = (
    "-Djdk.attach.allowAttachSelf=true",
    "--add-exports=java.base/jdk.internal.misc=ALL-UNNAMED",
    "--add-exports=java.management.rmi/com.sun.jmx.remote.internal.rmi=ALL-UNNAMED",
    "--add-exports=java.rmi/sun.rmi.registry=ALL-UNNAMED",
    "--add-exports=java.rmi/sun.rmi.server=ALL-UNNAMED",
    "--add-exports=java.sql/java.sql=ALL-UNNAMED",
    "--add-exports=java.base/java.lang.ref=ALL-UNNAMED",
    "--add-exports=jdk.unsupported/sun.misc=ALL-UNNAMED",
    "--add-exports=jdk.compiler/com.sun.tools.javac.file=ALL-UNNAMED",
    "--add-exports=jdk.attach/sun.tools.attach=ALL-UNNAMED",
    "--add-opens=java.base/java.lang.module=ALL-UNNAMED",
    "--add-opens=java.base/jdk.internal.loader=ALL-UNNAMED",
    "--add-opens=java.base/jdk.internal.ref=ALL-UNNAMED",
    "--add-opens=java.base/jdk.internal.reflect=ALL-UNNAMED",
    "--add-opens=java.base/jdk.internal.math=ALL-UNNAMED",
    "--add-opens=java.base/jdk.internal.module=ALL-UNNAMED",
    "--add-opens=java.base/jdk.internal.util.jar=ALL-UNNAMED",
    "--add-opens=jdk.management/com.sun.management.internal=ALL-UNNAMED",
    "--add-opens=java.base/sun.nio.ch=ALL-UNNAMED",
    "--add-opens=java.base/java.io=ALL-UNNAMED",
    "--add-opens=java.base/java.lang.reflect=ALL-UNNAMED",
    "--add-opens=jdk.compiler/com.sun.tools.javac=ALL-UNNAMED",
    "--add-opens=java.base/java.lang=ALL-UNNAMED",
    "--add-opens=java.base/java.util=ALL-UNNAMED",
    "-Dio.netty.tryReflectionSetAccessible=true",
    "-Dio.netty.allocator.useCacheForAllThreads=true",
    "-Dio.netty.allocator.maxOrder=11",
)
_JVM_FLAGS = (
    # Cassandra's own defaults: assertions on (except the chronicle queue's).
    "-ea",
    "-da:net.openhft...",
    "-Xss256k",
    "-XX:+UseThreadPriorities",
    "-XX:+PerfDisableSharedMem",
    "-Djava.net.preferIPv4Stack=true",
    # Die rather than run on after an OutOfMemoryError (Cassandra's start-up
    # check asks for one of these: a half-dead node can corrupt data).
    "-XX:+ExitOnOutOfMemoryError",
    # A small shared machine: start-up CPU matters more than peak speed.
    # C1 only compiles far less at start-up (the JIT is most of a cold
    # start's CPU); G1 stays (Cassandra's tested collector on JDK 17).
    "-XX:+UseG1GC",
    "-XX:TieredStopAtLevel=1",
    "-XX:CICompilerCount=2",
)
_FAST_START_FLAGS = (
    # A fresh local cluster: every node has its token in its yaml and all of
    # them are seeds, so nobody needs to wait for gossip to settle or a ring
    # delay before joining, and all nodes may join at once.
    "-Dcassandra.skip_wait_for_gossip_to_settle=0",
    "-Dcassandra.ring_delay_ms=1000",
    "-Dcassandra.consistent.rangemovement=false",
    # The failure detector's first guess of the gossip interval (default
    # 2 s) weighs on its mean for a young cluster; 1 s is the real interval.
    "-Dcassandra.fd_initial_value_ms=1000",
)

_LOGBACK = """\
<configuration scan="false">
  <!-- Everything to stdout, which ServerProcess appends to the node's log. -->
  <appender name="STDOUT" class="ch.qos.logback.core.ConsoleAppender">
    <encoder><pattern>%-5level [%thread] %date{ISO8601} %F:%L - %msg%n</pattern></encoder>
  </appender>
  <root level="INFO"><appender-ref ref="STDOUT"/></root>
  <logger name="com.datastax" level="WARN"/>
</configuration>
"""

_POLL = 0.2
"""Poll interval inside deadline loops (a probe is a few CQL round trips on
each node; not a synchronisation sleep)."""


# -- where Cassandra is ------------------------------------------------------------


def _cache_dir() -> Path:
    base = os.environ.get(CACHE_ENV) or str(Path.home() / ".cache" / "keepcount")
    return Path(base) / "cassandra"


def _is_install(path: Path) -> bool:
    lib = path / "lib"
    return any(lib.glob("cassandra-all-*.jar")) or any(lib.glob("apache-cassandra-*.jar"))


def _version_key(path: Path) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", path.name.rsplit("-", 1)[-1]))


def cassandra_home(home: Path | None = None) -> Path:
    """The Cassandra install to run: ``home`` if given, else
    ``$KEEPCOUNT_CASSANDRA_HOME``, else the newest 5.x that
    ``scripts/get-cassandra.sh`` put in ``${KEEPCOUNT_CACHE:-~/.cache/keepcount}/cassandra``.

    An install is a directory whose ``lib/`` holds the server jar with its
    dependencies (the official tarball's layout, or the one the script
    assembles).  ``FileNotFoundError`` naming the install command if there is
    none, or if ``java`` is missing.
    """
    candidates: list[Path]
    source = ""
    if home is not None:
        candidates = [Path(home)]
    elif os.environ.get(HOME_ENV):
        candidates = [Path(os.environ[HOME_ENV])]
        source = f" (from ${HOME_ENV})"
    else:
        found = [
            p
            for p in _cache_dir().glob("apache-cassandra-5.*")
            if (p / ".keepcount-complete").exists() and _is_install(p)
        ]
        candidates = sorted(found, key=_version_key, reverse=True)[:1]
    if not candidates or not _is_install(candidates[0]):
        where = str(candidates[0]) if candidates else str(_cache_dir() / "apache-cassandra-5.*")
        raise FileNotFoundError(
            f"Apache Cassandra is not installed (no server jars in {where}/lib{source}); "
            f"install it with: {INSTALL_HINT}"
        )
    if _java() is None:
        raise FileNotFoundError(
            "java is missing (Cassandra 5.0 runs on JDK 17); install it with: "
            "apt-get install -y openjdk-17-jdk-headless"
        )
    return candidates[0]


def _java() -> str | None:
    java_home = os.environ.get("JAVA_HOME")
    if java_home and (Path(java_home) / "bin" / "java").exists():
        return str(Path(java_home) / "bin" / "java")
    return shutil.which("java")


# -- probes ------------------------------------------------------------------------


class CqlError(Exception):
    """An error a node answered a probe with.  For *Unavailable*,
    ``required`` and ``alive`` are the replica counts the coordinator
    reported (``unavailable`` is then true)."""

    def __init__(
        self, message: str, *, unavailable: bool = False, required: int = 0, alive: int = 0
    ) -> None:
        super().__init__(message)
        self.unavailable = unavailable
        self.required = required
        self.alive = alive


class CqlConnection:
    """A ``cassandra-driver`` session pinned to one node: the manager's probe
    of *that* node's view (its ``system.*`` tables, its failure detector, as
    coordinator of the query).  Rows come back as dicts.

    ``OSError`` if the node does not answer within ``timeout`` seconds;
    ``CqlError`` for an error it answered.
    """

    def __init__(self, host: str, port: int, timeout: float = 2.0) -> None:
        import warnings

        from cassandra.cluster import EXEC_PROFILE_DEFAULT, Cluster, ExecutionProfile
        from cassandra.policies import FallthroughRetryPolicy, WhiteListRoundRobinPolicy
        from cassandra.query import dict_factory

        profile = ExecutionProfile(
            load_balancing_policy=WhiteListRoundRobinPolicy([host]),
            retry_policy=FallthroughRetryPolicy(),
            request_timeout=timeout,
            row_factory=dict_factory,
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the driver warns about hosts outside the whitelist
            self._cluster = Cluster(
                [host], port=port, protocol_version=5, connect_timeout=timeout,
                control_connection_timeout=timeout, execution_profiles={EXEC_PROFILE_DEFAULT: profile},
            )  # fmt: skip
        try:
            self._session = self._cluster.connect()
        except Exception as exc:
            self._cluster.shutdown()
            raise OSError(f"Cassandra at {host}:{port} does not answer: {exc}") from None

    def close(self) -> None:
        self._cluster.shutdown()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def query(self, cql: str, consistency: str = "ONE") -> list[dict[str, object]]:
        """Run one statement; its rows (empty for a statement without rows)."""
        import cassandra
        from cassandra import ConsistencyLevel
        from cassandra.query import SimpleStatement

        statement = SimpleStatement(cql, consistency_level=getattr(ConsistencyLevel, consistency))
        try:
            return list(self._session.execute(statement))
        except cassandra.Unavailable as exc:
            raise CqlError(
                str(exc), unavailable=True, required=exc.required_replicas,
                alive=exc.alive_replicas,
            ) from None  # fmt: skip
        except (cassandra.OperationTimedOut, cassandra.cluster.NoHostAvailable) as exc:
            raise OSError(str(exc)) from None
        except cassandra.DriverException as exc:
            raise CqlError(str(exc)) from None


# -- one node -------------------------------------------------------------------


@dataclass(frozen=True)
class _Settings:
    """What every node's config shares."""

    cluster_name: str
    seeds: str
    native_port: int
    storage_port: int
    heap_mb: int
    commitlog_sync: str
    jvm_options: tuple[str, ...]


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

    def write_config(self, s: _Settings) -> None:
        """``cassandra.yaml`` and ``logback.xml`` in ``conf_dir``.

        Only what differs from Cassandra 5.0's defaults: addresses and ports
        (loopback only), one token per node (precomputed: no token
        allocation, no bootstrap streaming), directories under the node's
        own, a commitlog that syncs before it acknowledges (G1), and no
        snapshots on drop/truncate (tests drop a keyspace each).
        """
        d = self.home_dir
        for sub in ("data", "commitlog", "hints", "saved_caches", "cdc_raw"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        if s.commitlog_sync == "batch":
            sync = ["commitlog_sync: batch"]
        else:
            sync = ["commitlog_sync: group", f"commitlog_sync_group_window: {GROUP_WINDOW_MS}ms"]
        yaml = [
            f"cluster_name: '{s.cluster_name}'",
            "num_tokens: 1",
            f"initial_token: {self.token}",
            "auto_bootstrap: false",
            "partitioner: org.apache.cassandra.dht.Murmur3Partitioner",
            "endpoint_snitch: SimpleSnitch",
            "seed_provider:",
            "  - class_name: org.apache.cassandra.locator.SimpleSeedProvider",
            "    parameters:",
            f'      - seeds: "{s.seeds}"',
            f"listen_address: {self.host}",
            f"rpc_address: {self.host}",
            f"storage_port: {s.storage_port}",
            f"native_transport_port: {s.native_port}",
            "start_native_transport: true",
            f"data_file_directories: ['{d / 'data'}']",
            f"commitlog_directory: '{d / 'commitlog'}'",
            f"hints_directory: '{d / 'hints'}'",
            f"saved_caches_directory: '{d / 'saved_caches'}'",
            f"cdc_raw_directory: '{d / 'cdc_raw'}'",
            *sync,
            "auto_snapshot: false",
            "snapshot_before_compaction: false",
            # Fewer idle threads on a 2-core machine (defaults are 32 each).
            "concurrent_reads: 8",
            "concurrent_writes: 8",
            "concurrent_counter_writes: 8",
            "concurrent_compactors: 1",
            f"phi_convict_threshold: {PHI_CONVICT_THRESHOLD}",
        ]
        self.conf_dir.mkdir(parents=True, exist_ok=True)
        (self.conf_dir / "cassandra.yaml").write_text("\n".join(yaml) + "\n")
        (self.conf_dir / "logback.xml").write_text(_LOGBACK)

    def argv(self, s: _Settings, java: str) -> list[str]:
        lib = self.cassandra_home / "lib"
        jamm = sorted(lib.glob("jamm-*.jar"))
        d = self.home_dir
        return [
            # MALLOC_ARENA_MAX as cassandra-env.sh sets it (glibc arenas per
            # thread would otherwise inflate the resident size); env execs
            # java, so the pid is java's.
            "env",
            "MALLOC_ARENA_MAX=4",
            java,
            f"-Xms{min(INITIAL_HEAP_MB, s.heap_mb)}M",
            f"-Xmx{s.heap_mb}M",
            *_JVM_FLAGS,
            *_JDK17_MODULE_FLAGS,
            # jamm measures object sizes (memtable accounting) as an agent.
            *([f"-javaagent:{jamm[-1]}"] if jamm else []),
            *_FAST_START_FLAGS,
            f"-Dcassandra.jmx.local.port={self.jmx_port}",
            f"-Dcassandra.config=file://{self.conf_dir / 'cassandra.yaml'}",
            f"-Dlogback.configurationFile={self.conf_dir / 'logback.xml'}",
            f"-Dcassandra.logdir={d / 'logs'}",
            f"-Dcassandra.storagedir={d}",
            f"-Dcassandra.triggers_dir={self.conf_dir / 'triggers'}",
            "-Dcassandra-foreground=yes",
            *s.jvm_options,
            "-cp",
            f"{lib}/*",
            "org.apache.cassandra.service.CassandraDaemon",
        ]

    def start(self, s: _Settings, java: str, note: str = "") -> None:
        self.write_config(s)
        (self.conf_dir / "triggers").mkdir(exist_ok=True)
        self.spawn(self.argv(s, java), note)

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


class CassandraCluster:
    """A Cassandra cluster of ``nodes`` (1 to 3) processes; see the module docstring.

    ``home``: the install (default: ``cassandra_home()``).  ``ports``:
    (native, storage) shared by every node, each on its own address; by
    default ports free on all of them (so concurrent test sessions never
    collide).  ``heap_mb``: ``-Xmx`` per node.  ``commitlog_sync``:
    ``"batch"`` (fsync before each acknowledgement; concurrent writes share
    an fsync) or ``"group"`` (a 2 ms window); never ``periodic`` (G1).
    ``jvm_options`` are appended to the JVM's flags (e.g. to compile with C2
    for a benchmark: ``["-XX:TieredStopAtLevel=4"]``).
    """

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
        java = _java()
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
        self.settings = _Settings(
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

    def running(self) -> list[int]:
        """Indices of nodes whose process exists (paused ones included)."""
        return [i for i, n in enumerate(self.nodes) if n.running()]

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
        while True:
            self._check_exits()
            live = self.live()
            pending = [i for i in live if not self._sees_up(i, live, deadline)]
            if not pending:
                return
            if time.monotonic() >= deadline:
                break
            time.sleep(_POLL)
        names = [self.nodes[i].name for i in pending]
        raise TimeoutError(
            f"Cassandra nodes {names} not UP with their peers within {timeout} s\n{self.logs()}"
        )

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
        deadline = time.monotonic() + timeout
        while True:
            live = self.live()
            # Short probes: before the conviction a CL ALL read waits the
            # server's whole read timeout; after it, Unavailable is instant.
            if all(self.alive_seen_by(j, timeout=1.0) == len(live) for j in live):
                return
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"Cassandra {self.nodes[i].name} not DOWN as seen by the others "
                    f"within {timeout} s\n{self.logs()}"
                )
            time.sleep(_POLL)

    def _check_exits(self) -> None:
        """``RuntimeError`` with the logs if a node exited other than by our
        SIGKILL."""
        for n in self.nodes:
            code = n.proc.poll() if n.proc is not None else None
            if code is not None and code != -signal.SIGKILL:
                raise RuntimeError(f"Cassandra {n.name} exited with {code}\n{self.logs()}")

    def kill(self, i: int) -> None:
        """SIGKILL node ``i`` and reap it (a crash: nothing is flushed; the
        commitlog holds every acknowledged write)."""
        self.nodes[i].kill()

    def pause(self, i: int) -> None:
        """SIGSTOP node ``i``; returns once the kernel shows it stopped."""
        self.nodes[i].pause()

    def resume(self, i: int) -> None:
        """SIGCONT node ``i``; returns once it runs again (not once the
        others hold it UP again: see ``wait_up``)."""
        self.nodes[i].resume()

    def restart(self, i: int, timeout: float = 180.0) -> None:
        """Kill node ``i`` if it runs, start it again on the same data dir
        (its commitlog replays; its token comes from its system tables) and
        return once it and every other live node hold each other UP."""
        node = self.nodes[i]
        node.kill()
        node.start(self.settings, self.java, " (restart)")
        self.wait_up(timeout)

    def stop(self) -> None:
        """SIGKILL every node and reap them all; idempotent."""
        for n in self.nodes:
            if n.proc is not None and n.proc.poll() is None:
                n.proc.send_signal(signal.SIGCONT)  # a stopped process dies on SIGKILL anyway
                n.proc.kill()
        for n in self.nodes:
            if n.proc is not None:
                n.proc.wait(30)

    def nodetool(self, i: int, *args: str, timeout: float = 60.0) -> str:
        """Run Cassandra's ``nodetool`` against node ``i`` over its JMX port
        (e.g. ``nodetool(0, "status")``); its output.  A JVM of its own
        (~1-2 s of CPU): for diagnostics, not for polling."""
        argv = [
            self.java,
            "-Xmx128M",
            "-XX:TieredStopAtLevel=1",
            *_JDK17_MODULE_FLAGS,
            f"-Dlogback.configurationFile={self.nodes[i].conf_dir / 'logback-tools.xml'}",
            "-cp",
            f"{self.home / 'lib'}/*",
            "org.apache.cassandra.tools.NodeTool",
            "-h",
            "127.0.0.1",
            "-p",
            str(self.nodes[i].jmx_port),
            *args,
        ]
        (self.nodes[i].conf_dir / "logback-tools.xml").write_text(_LOGBACK_TOOLS)
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            raise RuntimeError(
                f"nodetool {' '.join(args)} on {self.nodes[i].name} exited with "
                f"{done.returncode}: {done.stdout[-2000:]}{done.stderr[-2000:]}"
            )
        return done.stdout

    def logs(self, chars: int = 3000) -> str:
        """The tail of every node's log, labelled (for assertion messages)."""
        parts = []
        for n in self.nodes:
            state = "running" if n.running() else "down"
            if n.running() and not n.live():
                state = "paused"
            parts.append(f"--- Cassandra {n.name} ({n.host}, {state}) ---\n{n.log_tail(chars)}")
        return "\n".join(parts)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


_PROBE = (
    "SELECT status FROM system_distributed.view_build_status "
    "WHERE keyspace_name = 'keepcount_probe' AND view_name = 'probe'"
)
"""A one-partition read of a table replicated to every node (RF 3); the row
never exists, so the read costs each replica next to nothing."""

_LOGBACK_TOOLS = """\
<configuration scan="false">
  <appender name="STDERR" class="ch.qos.logback.core.ConsoleAppender">
    <target>System.err</target>
    <encoder><pattern>%-5level %msg%n</pattern></encoder>
  </appender>
  <root level="WARN"><appender-ref ref="STDERR"/></root>
</configuration>
"""
