"""A local etcd cluster as child processes: start, kill, pause, resume, restart.

Each member owns a data dir and a log file under the given directory and two
loopback ports (client, peer).  Every verb returns only after its effect is
observed: ``start``/``restart`` once the member(s) answer ``/health`` with
``{"health":"true"}`` (which needs a leader), ``kill``/``stop`` once the
process is reaped, ``pause``/``resume`` once ``/proc`` shows it stopped /
running again.

Teardown is SIGKILL: a graceful SIGTERM of a 3-member cluster takes 6-7 s
(docs/infra.md), and nothing here needs etcd's data after the test.

Example::

    cluster = EtcdCluster(tmp_path / "etcd", members=3)
    cluster.start()
    coordinator = open_coordinator(cluster.url_for("my-namespace"))
    cluster.kill(1)       # SIGKILL member 1 and reap it
    cluster.restart(1)    # same data dir, rejoins, healthy
    cluster.stop()

Not thread-safe: one owner (a test fixture, the cluster CLI) drives it.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Self

from keepcount import httpclient
from keepcount.cluster.processes import (
    ServerGroup,
    ServerProcess,
    check_ports_free,
    saved_identity,
)
from keepcount.nodeproc import free_port

__all__ = ["INSTALL_HINT", "EtcdCluster", "EtcdMember", "etcd_binary"]

IDENTITY_FILE = "keepcount-etcd.json"
"""In a cluster's directory: its size, ports and token (see ``saved_identity``)."""

INSTALL_HINT = "apt-get install -y etcd-server etcd-client"

# Raft timing for a loopback cluster (docs/infra.md): a lost leader is replaced in
# about one second instead of the defaults' several, and etcd's minimum lease
# TTL (1.5 election timeouts, rounded up to whole seconds) becomes 1 s, so
# 1-2 s TTLs are granted as asked.
HEARTBEAT_MS = 50
ELECTION_MS = 500


def etcd_binary() -> str:
    """Path of the ``etcd`` server binary; ``FileNotFoundError`` naming the
    install command if it is missing."""
    path = shutil.which("etcd")
    if path is None:
        raise FileNotFoundError(f"etcd is not installed; install it with: {INSTALL_HINT}")
    return path


class EtcdMember(ServerProcess):
    """One etcd member process; its ports and data dir outlive the process."""

    kind = "etcd member"

    def __init__(
        self, name: str, directory: Path, host: str, client_port: int, peer_port: int
    ) -> None:
        super().__init__(name, directory / f"{name}.log")
        self.host = host
        self.client_port = client_port
        self.peer_port = peer_port
        self.data_dir = directory / name

    @property
    def client_url(self) -> str:
        return f"http://{self.host}:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://{self.host}:{self.peer_port}"

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.client_port}"

    @property
    def address(self) -> str:
        return self.endpoint

    def start(self, initial_cluster: str, token: str, state: str) -> None:
        argv = [
            etcd_binary(),
            "--name", self.name,
            "--data-dir", str(self.data_dir),
            "--listen-client-urls", self.client_url,
            "--advertise-client-urls", self.client_url,
            "--listen-peer-urls", self.peer_url,
            "--initial-advertise-peer-urls", self.peer_url,
            "--initial-cluster", initial_cluster,
            "--initial-cluster-token", token,
            "--initial-cluster-state", state,
            "--heartbeat-interval", str(HEARTBEAT_MS),
            "--election-timeout", str(ELECTION_MS),
            "--logger", "zap",
            "--log-level", "warn",
        ]  # fmt: skip
        self.spawn(argv, f" ({state})")

    def health(self, timeout: float = 1.0) -> bool:
        """True if the member answers ``/health`` with health true (it has a
        leader and no alarm)."""
        body = self._http("GET", "/health", None, timeout)
        return body is not None and body.get("health") == "true"

    def status(self, timeout: float = 1.0) -> dict[str, object] | None:
        """``Maintenance.Status`` through the v3 JSON gateway, or None if it
        does not answer."""
        return self._http("POST", "/v3/maintenance/status", b"{}", timeout)

    def _http(
        self, method: str, path: str, body: bytes | None, timeout: float
    ) -> dict[str, object] | None:
        """One request to the client port; the JSON object answered, or None."""
        try:
            _, answer = httpclient.request(
                method, f"http://{self.host}:{self.client_port}{path}", body=body,
                timeout=timeout, headers={"Content-Type": "application/json"},
            )  # fmt: skip
            doc = json.loads(answer)
        except (OSError, ValueError):
            return None
        return doc if isinstance(doc, dict) else None

    def is_leader(self) -> bool:
        status = self.status()
        if status is None:
            return False
        header = status.get("header")
        if not isinstance(header, dict):
            return False
        return str(header.get("member_id")) == str(status.get("leader"))


class EtcdCluster(ServerGroup[EtcdMember]):
    """An etcd cluster of ``members`` processes on ``host``; see the module docstring.

    ``ports`` gives (client, peer) per member; by default the kernel picks
    free ones.  The URL lists every client endpoint so coordinators fail over
    between members.  ``kill``, ``pause``, ``resume``, ``stop``, ``logs``:
    ``ServerGroup`` (``resume`` returns once the member runs, not once it is
    healthy: with others paused it may have no quorum; see ``wait_healthy``).
    """

    label = "etcd"

    def __init__(
        self,
        directory: Path,
        members: int = 3,
        *,
        host: str = "127.0.0.1",
        ports: list[tuple[int, int]] | None = None,
        token: str | None = None,
    ) -> None:
        if members < 1:
            raise ValueError("an etcd cluster needs at least one member")
        if ports is not None and len(ports) != members:
            raise ValueError(f"{members} members need {members} (client, peer) port pairs")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.host = host

        def fresh() -> dict[str, Any]:
            pairs = ports or [(free_port(host), free_port(host)) for _ in range(members)]
            return {
                "members": members,
                "ports": [list(p) for p in pairs],
                "token": token or f"keepcount-{os.getpid()}-{pairs[0][0]}",
            }

        # Members find each other by the peer URLs their data was saved with:
        # the same directory starts again only on the same ports.
        identity = self.directory / IDENTITY_FILE
        existed = identity.exists()
        asked = {
            "members": members,
            "ports": [list(p) for p in ports] if ports else None,
            "token": token,
        }
        saved = saved_identity(identity, "an etcd cluster", asked, fresh)
        ports = [(int(c), int(p)) for c, p in saved["ports"]]
        if existed:
            check_ports_free([(host, p) for pair in ports for p in pair], self.directory)
        self.token = saved["token"]
        self.members = [
            EtcdMember(f"n{i}", self.directory, host, client, peer)
            for i, (client, peer) in enumerate(ports)
        ]
        self.initial_cluster = ",".join(f"{m.name}={m.peer_url}" for m in self.members)
        self.started = False

    # -- addresses ---------------------------------------------------------

    @property
    def endpoints(self) -> list[str]:
        return [m.endpoint for m in self.members]

    @property
    def url(self) -> str:
        """``etcd://h:p,h:p,...`` (default namespace)."""
        return "etcd://" + ",".join(self.endpoints)

    def url_for(self, namespace: str, *, first: int | None = None) -> str:
        """The coordinator URL with ``namespace``; ``first`` lists that
        member's endpoint first (a client connects to it first)."""
        endpoints = self.endpoints
        if first is not None:
            endpoints = endpoints[first:] + endpoints[:first]
        return f"etcd://{','.join(endpoints)}/{namespace}"

    # -- lifecycle ---------------------------------------------------------

    def start(self, timeout: float = 30.0) -> Self:
        """Start every member and return once all are healthy."""
        etcd_binary()
        state = "existing" if self.started else "new"
        for m in self.members:
            if not m.running():
                m.start(self.initial_cluster, self.token, state)
        self.started = True
        self.wait_healthy(range(len(self.members)), timeout)
        return self

    def wait_healthy(self, which: range | list[int] | None = None, timeout: float = 30.0) -> None:
        """Return once the given members (default: all running ones) answer
        ``/health`` true; raise ``TimeoutError`` with their logs otherwise."""
        self.wait_members(which, lambda m: m.health(timeout=0.5), timeout, "healthy")

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Every running member healthy (the name the cluster tooling uses for
        all servers)."""
        self.wait_healthy(None, timeout)

    def leader(self, timeout: float = 10.0) -> int:
        """Index of the current leader (waits for one to be elected)."""
        return self.find(EtcdMember.is_leader, timeout, "etcd leader")

    def restart(self, i: int, timeout: float = 30.0) -> None:
        """Kill member ``i`` if it runs, start it again on the same data dir
        (``--initial-cluster-state existing``) and wait until it is healthy."""
        m = self.members[i]
        m.kill()
        m.start(self.initial_cluster, self.token, "existing")
        self.wait_healthy([i], timeout)
