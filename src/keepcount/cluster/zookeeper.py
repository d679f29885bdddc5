"""A local ZooKeeper server or ensemble as child processes.

Java is called directly (``zkServer.sh`` forces system paths, docs/infra.md): each
member gets a ``zoo.cfg``, a ``log4j.properties`` that logs to the console
(captured in its log file) and a data dir under the given directory.  The
config keeps sessions short enough for 1-2 s claims: ``tickTime=500`` makes
the allowed session timeouts 1 s (2 ticks) to 10 s (20 ticks).  The admin
HTTP server is off (it would take :8080) and the four-letter words the
readiness poll and tests use are whitelisted.

Every verb returns only after its effect is observed: ``start``/``restart``
once ``srvr`` reports the member serving (standalone, leader or follower),
``kill``/``stop`` once the process is reaped, ``pause``/``resume`` once
``/proc`` shows it stopped / running again.

Example::

    zk = ZooKeeperServer(tmp_path / "zk")
    zk.start()
    coordinator = open_coordinator(zk.url_for("my-namespace"))
    zk.pause()      # SIGSTOP: sessions run out while it sleeps
    zk.resume()
    zk.stop()       # SIGKILL, reaped

Not thread-safe: one owner (a test fixture, the cluster CLI) drives it.
"""

from __future__ import annotations

import shutil
import socket
from collections.abc import Sequence
from pathlib import Path
from typing import Self

from keepcount.cluster.processes import ServerGroup, ServerProcess
from keepcount.nodeproc import free_port

__all__ = [
    "INSTALL_HINT",
    "ZooKeeperEnsemble",
    "ZooKeeperMember",
    "ZooKeeperServer",
    "four_letter_word",
    "zookeeper_classpath",
]

INSTALL_HINT = "apt-get install -y zookeeper"

TICK_MS = 500
_JARS = (
    "/usr/share/java/zookeeper.jar",
    # zookeeper.jar's manifest names its other dependencies; the log binding
    # is not among them (without it the server logs nothing).
    "/usr/share/java/slf4j-log4j12.jar",
    "/usr/share/java/log4j-1.2.jar",
)
_JVM = (
    "-Xmx256m",
    # Start-up speed and a small footprint matter more here than peak
    # throughput: a test machine has 2 cores shared with everything else.
    "-XX:+UseSerialGC",
    "-XX:TieredStopAtLevel=1",
    "-Dzookeeper.jmx.log4j.disable=true",
)
_LOG4J = """\
log4j.rootLogger=INFO, CONSOLE
log4j.appender.CONSOLE=org.apache.log4j.ConsoleAppender
log4j.appender.CONSOLE.layout=org.apache.log4j.PatternLayout
log4j.appender.CONSOLE.layout.ConversionPattern=%d{ISO8601} %-5p [%t:%C{1}@%L] - %m%n
"""


def zookeeper_classpath() -> str:
    """The jars a server needs; ``FileNotFoundError`` naming the install
    command if ZooKeeper or Java is missing."""
    missing = [jar for jar in _JARS if not Path(jar).exists()]
    if shutil.which("java") is None:
        missing.append("java")
    if missing:
        raise FileNotFoundError(
            f"ZooKeeper is not installed (missing {', '.join(missing)}); "
            f"install it with: {INSTALL_HINT}"
        )
    return ":".join(_JARS)


def four_letter_word(host: str, port: int, word: str, timeout: float = 1.0) -> str | None:
    """Send a four-letter command (``ruok``, ``srvr``, ``mntr``...); its
    answer, or None if nothing answers."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.sendall(word.encode())
            chunks = []
            while chunk := s.recv(4096):
                chunks.append(chunk)
    except OSError:
        return None
    return b"".join(chunks).decode(errors="replace")


class ZooKeeperMember(ServerProcess):
    """One ZooKeeper server process; its ports and data dir outlive the process."""

    kind = "ZooKeeper"

    def __init__(
        self,
        name: str,
        directory: Path,
        host: str,
        client_port: int,
        *,
        myid: int | None = None,
        servers: Sequence[str] = (),
    ) -> None:
        super().__init__(name, directory / f"{name}.log")
        self.host = host
        self.client_port = client_port
        self.myid = myid
        self.servers = list(servers)
        self.home = directory / name
        self.data_dir = self.home / "data"
        self.conf_dir = self.home / "conf"

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.client_port}"

    @property
    def address(self) -> str:
        return self.endpoint

    def _write_config(self) -> Path:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.conf_dir.mkdir(parents=True, exist_ok=True)
        lines = [
            f"tickTime={TICK_MS}",
            "initLimit=10",
            "syncLimit=5",
            f"minSessionTimeout={2 * TICK_MS}",
            f"maxSessionTimeout={20 * TICK_MS}",
            f"dataDir={self.data_dir}",
            f"clientPort={self.client_port}",
            f"clientPortAddress={self.host}",
            "admin.enableServer=false",
            "4lw.commands.whitelist=ruok,srvr,mntr,stat,envi,conf",
            # Snapshots of a test coordinator stay tiny; keep few of them.
            "autopurge.snapRetainCount=3",
            *self.servers,
        ]
        cfg = self.conf_dir / "zoo.cfg"
        cfg.write_text("\n".join(lines) + "\n")
        (self.conf_dir / "log4j.properties").write_text(_LOG4J)
        if self.myid is not None:
            (self.data_dir / "myid").write_text(f"{self.myid}\n")
        return cfg

    def start(self) -> None:
        classpath = f"{self.conf_dir}:{zookeeper_classpath()}"
        cfg = self._write_config()
        main = (
            "org.apache.zookeeper.server.quorum.QuorumPeerMain"
            if self.servers
            else "org.apache.zookeeper.server.ZooKeeperServerMain"
        )
        self.spawn(["java", *_JVM, "-cp", classpath, main, str(cfg)])

    def mode(self, timeout: float = 1.0) -> str | None:
        """``standalone``, ``leader``, ``follower``; None while not serving."""
        answer = four_letter_word(self.host, self.client_port, "srvr", timeout)
        if answer is None:
            return None
        for line in answer.splitlines():
            if line.startswith("Mode:"):
                return line.split(":", 1)[1].strip()
        return None

    def serving(self) -> bool:
        return self.mode() in ("standalone", "leader", "follower")


class _Servers(ServerGroup[ZooKeeperMember]):
    """What a standalone server and an ensemble share (``ServerGroup``: the
    fault verbs on member ``i``, ``stop``, ``logs``)."""

    kind = "ZooKeeper"
    label = "ZooKeeper"

    @property
    def endpoints(self) -> list[str]:
        return [m.endpoint for m in self.members]

    @property
    def url(self) -> str:
        """``zookeeper://h:p,...`` (default namespace)."""
        return "zookeeper://" + ",".join(self.endpoints)

    def url_for(self, namespace: str) -> str:
        return f"zookeeper://{','.join(self.endpoints)}/{namespace}"

    def start(self, timeout: float = 30.0) -> Self:
        """Start every member that is not running; return once all serve."""
        zookeeper_classpath()
        for m in self.members:
            if not m.running():
                m.start()
        self.wait_serving(range(len(self.members)), timeout)
        return self

    def wait_serving(self, which: range | list[int] | None = None, timeout: float = 30.0) -> None:
        """Return once the given members (default: all running ones) serve
        clients; ``TimeoutError`` with their logs otherwise."""
        self.wait_members(which, ZooKeeperMember.serving, timeout, "serving")

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Every running member serving (the name the cluster tooling uses for
        all servers)."""
        self.wait_serving(None, timeout)

    def restart(self, i: int = 0, timeout: float = 30.0) -> None:
        """Kill member ``i`` if it runs, start it on the same data dir, wait
        until it serves."""
        m = self.members[i]
        m.kill()
        m.start()
        self.wait_serving([i], timeout)


class ZooKeeperServer(_Servers):
    """A standalone ZooKeeper (``ZooKeeperServerMain``); see the module docstring."""

    kind = "ZooKeeper"

    def __init__(
        self, directory: Path, *, port: int | None = None, host: str = "127.0.0.1"
    ) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.host = host
        self.members = [
            ZooKeeperMember(
                "zk", self.directory, host, port if port is not None else free_port(host)
            )
        ]

    @property
    def member(self) -> ZooKeeperMember:
        return self.members[0]


class ZooKeeperEnsemble(_Servers):
    """A ZooKeeper ensemble of ``members`` peers (``QuorumPeerMain``, one
    ``myid`` file each); ``ports`` gives (client, quorum, election) per member."""

    kind = "ZooKeeper ensemble member"

    def __init__(
        self,
        directory: Path,
        members: int = 3,
        *,
        host: str = "127.0.0.1",
        ports: list[tuple[int, int, int]] | None = None,
    ) -> None:
        if members < 1:
            raise ValueError("an ensemble needs at least one member")
        if ports is None:
            ports = [(free_port(host), free_port(host), free_port(host)) for _ in range(members)]
        if len(ports) != members:
            raise ValueError(f"{members} members need {members} port triples")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.host = host
        servers = [
            f"server.{i + 1}={host}:{quorum}:{election}"
            for i, (_, quorum, election) in enumerate(ports)
        ]
        self.members = [
            ZooKeeperMember(f"zk{i + 1}", self.directory, host, client, myid=i + 1, servers=servers)
            for i, (client, _, _) in enumerate(ports)
        ]

    def leader(self, timeout: float = 10.0) -> int:
        """Index of the current leader (waits for one)."""
        return self.find(lambda m: m.mode() == "leader", timeout, "ZooKeeper leader")
