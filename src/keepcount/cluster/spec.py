"""What a local cluster is made of, saved as ``<dir>/cluster.json``.

``keepcount cluster up`` allocates the spec once (ports, node ids, which
load balancer and coordinator, the store) and writes it before anything
starts; every later command (``status``, ``kill``, ``restart``, ``down``) and
the supervisor read it from the directory.

Each node id has **two slots** (two ports): a new incarnation starts on a
slot no live process holds.  A node paused past its claim TTL (SIGSTOP) still
holds its port; its replacement cannot wait for it, so it takes the other
slot, and the load balancer, which lists both, routes to whichever answers
``/readyz``.

Example::

    spec = ClusterSpec.allocate(Path("/tmp/c"), nodes=3)
    spec.save()
    assert ClusterSpec.load(Path("/tmp/c")) == spec
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from keepcount.cluster.balancer import KINDS
from keepcount.errors import InvalidInput
from keepcount.nodeproc import free_port

__all__ = [
    "BALANCERS",
    "CLAIM_TTL_RANGE",
    "COORDINATORS",
    "DEFAULT_CLAIM_TTL",
    "DEFAULT_COORDINATOR",
    "DEFAULT_HOST",
    "DEFAULT_LB",
    "DEFAULT_NODES",
    "DEFAULT_PORT",
    "MAX_NODES",
    "SPEC_FILE",
    "ClusterSpec",
    "NodeSpec",
    "slot_name",
]

SPEC_FILE = "cluster.json"
BALANCERS = KINDS
COORDINATORS = ("etcd", "zookeeper")
SLOTS = ("a", "b")

# The defaults of a cluster, here only: ``ClusterSpec``, ``ClusterSpec.allocate``,
# ``ClusterSpec.load`` (a spec saved without a field) and the options of
# ``keepcount cluster up`` read them.
DEFAULT_NODES = 3
MAX_NODES = 32
DEFAULT_LB = "haproxy"
DEFAULT_COORDINATOR = "etcd"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8100
"""``keepcount cluster up``'s load balancer port (the nodes' and the API's follow it)."""
DEFAULT_CLAIM_TTL = 3.0
CLAIM_TTL_RANGE = (1.0, 60.0)
"""Seconds ``keepcount cluster up --claim-ttl`` accepts."""

Balancer = Literal["haproxy", "nginx"]
CoordinatorKind = Literal["etcd", "zookeeper"]


def slot_name(node: str, slot: int) -> str:
    """The load balancer's name for one slot of a node: ``node-1.a``."""
    return f"{node}.{SLOTS[slot]}"


@dataclass(frozen=True, slots=True)
class NodeSpec:
    id: str
    ports: tuple[int, int]
    """The two slots' ports (see the module docstring)."""


@dataclass(frozen=True, slots=True)
class ClusterSpec:
    directory: Path
    nodes: tuple[NodeSpec, ...]
    lb: Balancer
    lb_port: int
    coordinator: CoordinatorKind
    store: str
    """A store URL, ``cassandra`` (a local 3-node Apache Cassandra cluster the
    supervisor starts under ``directory``) or ``bigtable`` (a local Bigtable
    emulator: in memory only)."""
    api_port: int
    """The supervisor's control API (and, later, its /ui page)."""
    host: str = DEFAULT_HOST
    claim_ttl: float = DEFAULT_CLAIM_TTL
    extra: dict[str, Any] = field(default_factory=dict)
    """Options for the tooling: ``node_args`` (extra ``keepcount node`` arguments),
    ``clocks`` (true: nodes run on wall clocks a fault can jump,
    ``keepcount.cluster.clocks``)."""

    @property
    def lb_url(self) -> str:
        return f"http://{self.host}:{self.lb_port}"

    @property
    def api_url(self) -> str:
        return f"http://{self.host}:{self.api_port}"

    def node(self, node_id: str) -> NodeSpec:
        for n in self.nodes:
            if n.id == node_id:
                return n
        known = ", ".join(n.id for n in self.nodes)
        raise InvalidInput(f"no node {node_id!r} in this cluster (nodes: {known})")

    @classmethod
    def allocate(
        cls,
        directory: Path,
        *,
        nodes: int = DEFAULT_NODES,
        lb: str = DEFAULT_LB,
        coordinator: str = DEFAULT_COORDINATOR,
        store: str | None = None,
        port: int | None = None,
        claim_ttl: float = DEFAULT_CLAIM_TTL,
        extra: dict[str, Any] | None = None,
    ) -> ClusterSpec:
        """Node ids ``node-1..node-N``; with ``port`` the LB listens on it and
        the nodes' slots take the ports after it (``port+1``, ...), the API
        the next one; without, every port is a free one the kernel picks."""
        if not 1 <= nodes <= MAX_NODES:
            raise InvalidInput(f"--nodes must be 1 to {MAX_NODES}, not {nodes}")
        if lb not in BALANCERS:
            raise InvalidInput(f"unknown load balancer {lb!r}: choose one of {BALANCERS}")
        if coordinator not in COORDINATORS:
            raise InvalidInput(f"unknown coordinator {coordinator!r}: choose one of {COORDINATORS}")
        directory = directory.resolve()
        ports: Iterator[int]
        if port is None:
            picked: list[int] = []
            while len(picked) < 2 * nodes + 2:
                p = free_port()
                if p not in picked:  # the kernel may hand the same port out twice
                    picked.append(p)
            ports = iter(picked)
        else:
            if not 1024 <= port <= 65535 - 2 * nodes - 1:
                raise InvalidInput(f"--port {port} leaves no room for {nodes} nodes' ports")
            ports = iter(range(port, port + 2 * nodes + 2))
        lb_port = next(ports)
        specs = tuple(
            NodeSpec(f"node-{i}", (next(ports), next(ports))) for i in range(1, nodes + 1)
        )
        api_port = next(ports)
        return cls(
            directory=directory,
            nodes=specs,
            lb=lb,  # type: ignore[arg-type]
            lb_port=lb_port,
            coordinator=coordinator,  # type: ignore[arg-type]
            store=store or f"sqlite:///{directory}/counters.db",
            api_port=api_port,
            claim_ttl=claim_ttl,
            extra=dict(extra or {}),
        )

    def save(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        doc = asdict(self)
        doc["directory"] = str(self.directory)
        tmp = self.directory / f".{SPEC_FILE}.tmp"
        tmp.write_text(json.dumps(doc, indent=2) + "\n")
        os.replace(tmp, self.directory / SPEC_FILE)

    @classmethod
    def load(cls, directory: Path) -> ClusterSpec:
        path = directory / SPEC_FILE
        try:
            doc = json.loads(path.read_text())
        except FileNotFoundError:
            raise InvalidInput(
                f"no cluster in {directory} ({SPEC_FILE} is missing): start one with "
                f"`keepcount cluster up --dir {directory}`"
            ) from None
        except (OSError, ValueError) as exc:
            raise InvalidInput(f"cannot read {path}: {exc}") from None
        return cls(
            directory=Path(doc["directory"]),
            nodes=tuple(NodeSpec(n["id"], (n["ports"][0], n["ports"][1])) for n in doc["nodes"]),
            lb=doc["lb"],
            lb_port=doc["lb_port"],
            coordinator=doc["coordinator"],
            store=doc["store"],
            api_port=doc["api_port"],
            host=doc.get("host", DEFAULT_HOST),
            claim_ttl=doc.get("claim_ttl", DEFAULT_CLAIM_TTL),
            extra=doc.get("extra", {}),
        )
