"""Network partitions on loopback (``keepcount.cluster.partition``), for real.

A child process is put in a slot's cgroup the way the supervisor puts a node
there; nftables rules are installed and removed in the kernel.  Every check
is a real TCP connection on 127.0.0.1: the partitioned child's, and an
outsider's (this test process) that must not be affected.

Needs root and nftables; without them the tests fail with the command that
installs what is missing (never skip).
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from keepcount.cluster import partition
from keepcount.cluster.partition import Partitions, endpoints_of

pytestmark = pytest.mark.cluster

# A child that answers one command a line: "connect HOST PORT" (a new
# connection, 1 s to answer), "send" (an echo over the connection it opened
# first, 1 s to answer); it listens on a port of its own (first line out).
CHILD = r"""
import socket, sys
srv = socket.create_server(("127.0.0.1", 0))
print(srv.getsockname()[1], flush=True)
kept = None
for line in sys.stdin:
    cmd = line.split()
    try:
        if cmd[0] == "connect":
            s = socket.create_connection((cmd[1], int(cmd[2])), timeout=1)
            s.settimeout(1)
            if kept is None:
                kept = s
            else:
                s.close()
        else:
            kept.sendall(b"x")
            assert kept.recv(1) == b"x"
        print("ok", flush=True)
    except TimeoutError:
        print("timeout", flush=True)
    except OSError as exc:
        print(f"error {exc}", flush=True)
"""


@pytest.fixture
def parts() -> Iterator[Partitions]:
    why = partition.unavailable()
    if why is not None:
        pytest.fail(f"{why} (as root: {partition.INSTALL})", pytrace=False)
    p = Partitions.create()
    try:
        yield p
    finally:
        p.close()


class Echo:
    """A TCP echo server on 127.0.0.1 (a stand-in for a coordinator or a store)."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    @staticmethod
    def _echo(conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            while data := conn.recv(64):
                conn.sendall(data)

    @property
    def endpoint(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)


class Child:
    def __init__(self, parts: Partitions, slot: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        parts.adopt(slot, self.proc.pid)  # before it reads its first command
        assert self.proc.stdout is not None
        self.port = int(self.proc.stdout.readline())

    def ask(self, line: str) -> str:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        return self.proc.stdout.readline().strip()

    def connect(self, endpoint: tuple[str, int]) -> str:
        return self.ask(f"connect {endpoint[0]} {endpoint[1]}")

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                pipe.close()


def outsider_connects(endpoint: tuple[str, int]) -> str:
    try:
        with socket.create_connection(endpoint, timeout=1):
            return "ok"
    except TimeoutError:
        return "timeout"


@pytest.fixture
def servers() -> Iterator[tuple[Echo, Echo]]:
    coord, store = Echo(), Echo()
    yield coord, store
    coord.sock.close()
    store.sock.close()


def test_a_coordinator_partition_cuts_that_process_from_the_coordinator_only(
    parts: Partitions, servers: tuple[Echo, Echo]
) -> None:
    coord, store = servers
    child = Child(parts, "node-1.a")
    try:
        assert child.connect(coord.endpoint) == "ok"  # the kept connection
        assert child.ask("send") == "ok"
        parts.cut("node-1.a", "coordinator", coordinator=[coord.endpoint], port=child.port)
        assert child.connect(coord.endpoint) == "timeout", "a new connection is dropped"
        assert child.ask("send") == "timeout", "an open one stalls (not refused: half-open)"
        assert child.connect(store.endpoint) == "ok", "the store is still reached"
        assert outsider_connects(coord.endpoint) == "ok", "other processes are not cut"
        assert outsider_connects(("127.0.0.1", child.port)) == "ok", "it is still reached"
        parts.heal()
        assert child.connect(coord.endpoint) == "ok"
        assert child.ask("send") == "ok", "the stalled connection resumes"
    finally:
        child.close()


def test_a_store_partition_cuts_only_the_store(
    parts: Partitions, servers: tuple[Echo, Echo]
) -> None:
    coord, store = servers
    child = Child(parts, "node-2.b")
    try:
        parts.cut("node-2.b", "store", store=[store.endpoint], port=child.port)
        assert child.connect(store.endpoint) == "timeout"
        assert child.connect(coord.endpoint) == "ok"
        assert outsider_connects(store.endpoint) == "ok"
        parts.heal()
        assert child.connect(store.endpoint) == "ok"
    finally:
        child.close()


def test_an_isolated_process_reaches_nobody_and_nobody_reaches_it(
    parts: Partitions, servers: tuple[Echo, Echo]
) -> None:
    coord, store = servers
    child, other = Child(parts, "node-3.a"), Child(parts, "node-3.b")
    try:
        parts.cut("node-3.a", "isolate", port=child.port)
        assert child.connect(coord.endpoint) == "timeout"
        assert child.connect(store.endpoint) == "timeout"
        assert outsider_connects(("127.0.0.1", child.port)) == "timeout"
        assert other.connect(coord.endpoint) == "ok", "another slot is another host"
        assert outsider_connects(("127.0.0.1", other.port)) == "ok"
        parts.heal()
        assert child.connect(coord.endpoint) == "ok"
        assert outsider_connects(("127.0.0.1", child.port)) == "ok"
    finally:
        child.close()
        other.close()


def test_close_removes_the_table_and_the_cgroups() -> None:
    why = partition.unavailable()
    if why is not None:
        pytest.fail(f"{why} (as root: {partition.INSTALL})", pytrace=False)
    p = Partitions.create()
    child = Child(p, "node-1.a")
    cgroup = p.mount / p.name
    assert (cgroup / "node-1.a").is_dir()
    pid = str(child.proc.pid)
    assert pid in (cgroup / "node-1.a" / "cgroup.procs").read_text().split()
    child.close()
    p.close()
    tables = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True).stdout
    assert p.table not in tables
    assert not cgroup.exists()
    assert not (Path("/sys/fs/cgroup") / p.name).is_symlink()


def test_endpoints_of_urls() -> None:
    assert endpoints_of("etcd://127.0.0.1:2379,127.0.0.1:2380/ns") == [
        ("127.0.0.1", 2379),
        ("127.0.0.1", 2380),
    ]
    assert endpoints_of("cassandra://127.0.0.2:9042/ks") == [("127.0.0.2", 9042)]
    assert endpoints_of("sqlite:////tmp/x.db") == []


def test_a_bad_mode_or_slot_is_refused(parts: Partitions) -> None:
    with pytest.raises(ValueError, match="unknown partition mode"):
        parts.cut("node-1.a", "cable", port=1)
    with pytest.raises(ValueError, match="bad slot name"):
        parts.adopt("../../etc", 1)
    with pytest.raises(partition.PartitionError, match="no store endpoints"):
        parts.cut("node-1.a", "store", store=[], port=1)
