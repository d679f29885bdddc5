"""What a local Cassandra node runs with: the install, its JVM flags, its config.

Pure configuration, no process: ``cassandra_home`` finds the install
(``scripts/get-cassandra.sh`` puts Cassandra 5.0 in keepcount's cache),
``write_config`` renders a node's ``cassandra.yaml`` and ``logback.xml``,
``node_argv`` and ``nodetool_argv`` its command lines.  The process and the
cluster are ``keepcount.cluster.cassandra``.

Durability (DESIGN G1): ``commitlog_sync: batch`` (or ``group`` with a 2 ms
window), so a write is acknowledged only after its commitlog segment was
fsynced, never the ``periodic`` default that acknowledges before the sync.

Corruption (issue 18): keepcount's tables are compressed in chunks whose
CRC every read checks (``stores.cassandra.session``), so a replica never
serves a flipped byte of its SSTables.  ``disk_failure_policy:
stop_paranoid`` then takes that replica out: on a corrupt SSTable it stops
its gossip and client transports (and a corrupt SSTable found at start-up
stops the JVM), so the others convict it and QUORUM reads and writes go on
with them, instead of the replica failing its share of every QUORUM read
that touches the chunk (``stop``, the default, acts on I/O errors only).
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "DEFAULT_HEAP_MB",
    "INSTALL_HINT",
    "WRITE_REQUEST_TIMEOUT",
    "NodeSettings",
    "cassandra_home",
    "java_binary",
    "node_argv",
    "nodetool_argv",
    "write_config",
]

INSTALL_HINT = "scripts/get-cassandra.sh"
"""The command that installs Cassandra where ``cassandra_home`` looks."""

HOME_ENV = "KEEPCOUNT_CASSANDRA_HOME"
CACHE_ENV = "KEEPCOUNT_CACHE"

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

WRITE_REQUEST_TIMEOUT = 2.0
"""Seconds a coordinator waits for replicas before it answers a write or a
lightweight transaction ``WriteTimeout`` (Cassandra's default, written
explicitly: a load balancer in front of keepcount nodes must wait longer
than this, ``keepcount.cluster.supervisor.answer_timeout``)."""

GROUP_WINDOW_MS = 2
"""``commitlog_sync: group`` window: an acknowledged write waits at most this
long for the fsync that covers it, and concurrent writes share one fsync."""

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

_LOGBACK_TOOLS = """\
<configuration scan="false">
  <appender name="STDERR" class="ch.qos.logback.core.ConsoleAppender">
    <target>System.err</target>
    <encoder><pattern>%-5level %msg%n</pattern></encoder>
  </appender>
  <root level="WARN"><appender-ref ref="STDERR"/></root>
</configuration>
"""


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
    if java_binary() is None:
        raise FileNotFoundError(
            "java is missing (Cassandra 5.0 runs on JDK 17); install it with: "
            "apt-get install -y openjdk-17-jdk-headless"
        )
    return candidates[0]


def java_binary() -> str | None:
    """``$JAVA_HOME/bin/java``, else ``java`` on the PATH; None if neither exists."""
    java_home = os.environ.get("JAVA_HOME")
    if java_home and (Path(java_home) / "bin" / "java").exists():
        return str(Path(java_home) / "bin" / "java")
    return shutil.which("java")


# -- one node's config ------------------------------------------------------------


@dataclass(frozen=True)
class NodeSettings:
    """What every node's config shares."""

    cluster_name: str
    seeds: str
    native_port: int
    storage_port: int
    heap_mb: int
    commitlog_sync: str
    jvm_options: tuple[str, ...]


def write_config(home_dir: Path, host: str, token: int, s: NodeSettings) -> None:
    """``cassandra.yaml`` and ``logback.xml`` in ``home_dir/conf`` for the node
    at ``host`` whose first token is ``token``.

    Only what differs from Cassandra 5.0's defaults: addresses and ports
    (loopback only), one token per node (precomputed: no token
    allocation, no bootstrap streaming), directories under the node's
    own, a commitlog that syncs before it acknowledges (G1), no
    snapshots on drop/truncate (tests drop a keyspace each), and Paxos v2
    for lightweight transactions.
    """
    d = home_dir
    conf_dir = home_dir / "conf"
    for sub in ("data", "commitlog", "hints", "saved_caches", "cdc_raw"):
        (d / sub).mkdir(parents=True, exist_ok=True)
    if s.commitlog_sync == "batch":
        sync = ["commitlog_sync: batch"]
    else:
        sync = ["commitlog_sync: group", f"commitlog_sync_group_window: {GROUP_WINDOW_MS}ms"]
    yaml = [
        f"cluster_name: '{s.cluster_name}'",
        "num_tokens: 1",
        f"initial_token: {token}",
        "auto_bootstrap: false",
        "partitioner: org.apache.cassandra.dht.Murmur3Partitioner",
        "endpoint_snitch: SimpleSnitch",
        "seed_provider:",
        "  - class_name: org.apache.cassandra.locator.SimpleSeedProvider",
        "    parameters:",
        f'      - seeds: "{s.seeds}"',
        f"listen_address: {host}",
        f"rpc_address: {host}",
        f"storage_port: {s.storage_port}",
        f"native_transport_port: {s.native_port}",
        "start_native_transport: true",
        f"data_file_directories: ['{d / 'data'}']",
        f"commitlog_directory: '{d / 'commitlog'}'",
        f"hints_directory: '{d / 'hints'}'",
        f"saved_caches_directory: '{d / 'saved_caches'}'",
        f"cdc_raw_directory: '{d / 'cdc_raw'}'",
        *sync,
        "disk_failure_policy: stop_paranoid",
        "auto_snapshot: false",
        "snapshot_before_compaction: false",
        # Fewer idle threads on a 2-core machine (defaults are 32 each).
        "concurrent_reads: 8",
        "concurrent_writes: 8",
        "concurrent_counter_writes: 8",
        "concurrent_compactors: 1",
        f"phi_convict_threshold: {PHI_CONVICT_THRESHOLD}",
        f"write_request_timeout: {int(WRITE_REQUEST_TIMEOUT * 1000)}ms",
        # Paxos v2 (Cassandra 4.1+): with v1, a lightweight transaction that
        # lost a round waits for every participant, a dead replica not yet
        # convicted included, for write_request_timeout (CASSANDRA-6013), and
        # keyed increments stalled 5-11 s in 1 run of 4 after a replica's
        # SIGKILL (docs/stores.md, "Paxos v2").
        "paxos_variant: v2",
    ]
    conf_dir.mkdir(parents=True, exist_ok=True)
    (conf_dir / "cassandra.yaml").write_text("\n".join(yaml) + "\n")
    (conf_dir / "logback.xml").write_text(_LOGBACK)


def node_argv(
    home_dir: Path, install: Path, jmx_port: int, s: NodeSettings, java: str
) -> list[str]:
    """The command line of the node whose directory is ``home_dir``: ``java``
    running ``CassandraDaemon`` from ``install`` with its config (``write_config``)."""
    lib = install / "lib"
    jamm = sorted(lib.glob("jamm-*.jar"))
    d = home_dir
    conf_dir = home_dir / "conf"
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
        f"-Dcassandra.jmx.local.port={jmx_port}",
        f"-Dcassandra.config=file://{conf_dir / 'cassandra.yaml'}",
        f"-Dlogback.configurationFile={conf_dir / 'logback.xml'}",
        f"-Dcassandra.logdir={d / 'logs'}",
        f"-Dcassandra.storagedir={d}",
        f"-Dcassandra.triggers_dir={conf_dir / 'triggers'}",
        "-Dcassandra-foreground=yes",
        *s.jvm_options,
        "-cp",
        f"{lib}/*",
        "org.apache.cassandra.service.CassandraDaemon",
    ]


def nodetool_argv(java: str, install: Path, conf_dir: Path, jmx_port: int, *args: str) -> list[str]:
    """The command line of ``nodetool ARGS`` against the node whose JMX port is
    ``jmx_port`` (its logging config is written to ``conf_dir``)."""
    (conf_dir / "logback-tools.xml").write_text(_LOGBACK_TOOLS)
    return [
        java,
        "-Xmx128M",
        "-XX:TieredStopAtLevel=1",
        *_JDK17_MODULE_FLAGS,
        f"-Dlogback.configurationFile={conf_dir / 'logback-tools.xml'}",
        "-cp",
        f"{install / 'lib'}/*",
        "org.apache.cassandra.tools.NodeTool",
        "-h",
        "127.0.0.1",
        "-p",
        str(jmx_port),
        *args,
    ]
