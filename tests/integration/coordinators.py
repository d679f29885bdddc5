"""Fixtures and helpers for the coordinator conformance suite.

Real servers, one of each per test session (``etcd_cluster``: 3 members;
``zookeeper_server``: standalone), each test in a namespace of its own;
``private_servers`` gives a test fresh servers of the same kind that it may
pause or kill.  A test module takes the fixtures by assigning them to
module-level names (``coordinator_url = coordinators.coordinator_url``).

Server log tails are printed in each test's teardown: pytest shows captured
output only for failing tests, so they appear exactly when needed.

``Holder`` runs a claim in a child process driven over stdin/stdout, so
tests can SIGKILL or SIGSTOP a real holder.
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import pytest

from keepcount.cluster.etcd import EtcdCluster, etcd_binary
from keepcount.cluster.zookeeper import ZooKeeperServer, zookeeper_classpath
from keepcount.coordination import open_coordinator
from keepcount.coordination.base import Coordinator, Member

BACKENDS = ["etcd", "zookeeper"]


class Servers(Protocol):
    def url_for(self, namespace: str) -> str: ...
    def logs(self, chars: int = 3000) -> str: ...
    def pause_all(self) -> None: ...
    def resume_all(self) -> None: ...
    def wait_ready(self, timeout: float = 30.0) -> None: ...
    def stop(self) -> None: ...


def require(kind: str) -> None:
    """Fail (never skip) with the install command if a server is missing."""
    try:
        etcd_binary() if kind == "etcd" else zookeeper_classpath()
    except FileNotFoundError as exc:
        pytest.fail(str(exc), pytrace=False)


def start_servers(kind: str, directory: Path) -> Servers:
    require(kind)
    servers: Servers
    if kind == "etcd":
        servers = EtcdCluster(directory, members=3)
        servers.start()
    else:
        servers = ZooKeeperServer(directory)
        servers.start()
    return servers


@dataclass
class Backend:
    kind: str
    servers: Servers

    def url_for(self, namespace: str) -> str:
        return self.servers.url_for(namespace)


@pytest.fixture(scope="session")
def etcd_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    require("etcd")
    cluster = EtcdCluster(tmp_path_factory.mktemp("etcd"), members=3)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def zookeeper_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ZooKeeperServer]:
    require("zookeeper")
    server = ZooKeeperServer(tmp_path_factory.mktemp("zookeeper"))
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    """The shared server of one backend (started on first use)."""
    kind: str = request.param
    servers = request.getfixturevalue("etcd_cluster" if kind == "etcd" else "zookeeper_server")
    yield Backend(kind, servers)
    print(f"\n=== {kind} logs (tail) ===\n{servers.logs(2000)}")


@pytest.fixture
def namespace() -> str:
    return f"t{uuid.uuid4().hex[:12]}"


@pytest.fixture
def coordinator_url(backend: Backend, namespace: str) -> str:
    return backend.url_for(namespace)


@pytest.fixture
def coordinator(coordinator_url: str) -> Iterator[Coordinator]:
    c = open_coordinator(coordinator_url)
    yield c
    c.close()


@pytest.fixture
def other(coordinator_url: str) -> Iterator[Coordinator]:
    """A second coordinator on the same namespace (another process's view)."""
    c = open_coordinator(coordinator_url)
    yield c
    c.close()


@pytest.fixture
def private_servers(backend: Backend, tmp_path: Path) -> Iterator[Servers]:
    """Fresh servers of the test's backend, for tests that pause or kill them."""
    servers = start_servers(backend.kind, tmp_path / f"private-{backend.kind}")
    try:
        yield servers
    finally:
        print(f"\n=== private {backend.kind} logs (tail) ===\n{servers.logs(3000)}")
        servers.stop()


# -- waiting --------------------------------------------------------------------


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll until ``predicate()``; the monotonic time it first held.
    ``AssertionError`` naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        now = time.monotonic()
        if predicate():
            return now
        if now > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(0.01)  # poll interval inside a deadline loop


class Recorder:
    """A watch callback that keeps every snapshot and lets a test await one."""

    def __init__(self) -> None:
        self.snapshots: list[tuple[float, dict[str, Member]]] = []
        self.threads: set[int] = set()
        self.overlaps = 0
        self._inside = 0
        self._cond = threading.Condition()

    def __call__(self, members: dict[str, Member]) -> None:
        with self._cond:
            self._inside += 1
            if self._inside > 1:
                self.overlaps += 1
        # Outside the lock, so overlapping calls could be detected.
        time.sleep(0.001)
        with self._cond:
            self._inside -= 1
            self.snapshots.append((time.monotonic(), members))
            self.threads.add(threading.get_ident())
            self._cond.notify_all()

    def wait(
        self,
        predicate: Callable[[dict[str, Member]], bool],
        timeout: float,
        what: str,
        since: int = 0,
    ) -> tuple[int, float, dict[str, Member]]:
        """The first snapshot from index ``since`` on that satisfies
        ``predicate``: (index, arrival time, snapshot)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for i in range(since, len(self.snapshots)):
                    at, members = self.snapshots[i]
                    if predicate(members):
                        return i, at, members
                left = deadline - time.monotonic()
                if left <= 0:
                    seen = [sorted(m) for _, m in self.snapshots[since:]]
                    raise AssertionError(f"watch never saw {what} within {timeout} s; saw {seen}")
                self._cond.wait(left)

    def __len__(self) -> int:
        with self._cond:
            return len(self.snapshots)


# -- a claim held by a child process ----------------------------------------------

HOLDER = r"""
import os, sys, time
from keepcount.coordination import open_coordinator

url, node, ttl = sys.argv[1], sys.argv[2], float(sys.argv[3])
coordinator = open_coordinator(url)
try:
    claim = coordinator.claim(node, {"pid": str(os.getpid()), "role": "holder"}, ttl=ttl, timeout=10)
except Exception as exc:
    print("error", type(exc).__name__, exc, flush=True)
    sys.exit(1)
print("claimed", claim.epoch, claim.ttl, flush=True)
for line in sys.stdin:
    cmd = line.strip()
    if cmd == "state":
        trusted = claim.trusted()
        left = claim.deadline() - time.monotonic()
        print("state", int(trusted), int(claim.lost), left, flush=True)
    elif cmd == "release":
        claim.release()
        print("released", flush=True)
    elif cmd == "exit":
        break
coordinator.close()
"""


@dataclass
class HolderState:
    trusted: bool
    lost: bool
    left: float
    """deadline() - monotonic() in the holder (-inf once lost)."""


class Holder:
    """``HOLDER`` in a child process: claims ``node`` and answers ``state``."""

    def __init__(self, url: str, node: str, ttl: float, log: Path) -> None:
        self.log = log
        self._stderr = open(log, "wb")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            [sys.executable, "-c", HOLDER, url, node, str(ttl)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
            bufsize=1,
        )
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line.strip())
        self._lines.put(None)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def expect(self, word: str, timeout: float) -> list[str]:
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"holder said nothing within {timeout} s{self.tail()}") from None
        if line is None or not line.startswith(word):
            raise AssertionError(f"holder said {line!r}, expected {word!r}{self.tail()}")
        return line.split()[1:]

    def claimed(self, timeout: float = 20.0) -> tuple[int, float]:
        """Await the claim: (epoch, ttl)."""
        epoch, ttl = self.expect("claimed", timeout)
        return int(epoch), float(ttl)

    def state(self, timeout: float = 5.0) -> HolderState:
        assert self.proc.stdin is not None
        self.proc.stdin.write("state\n")
        self.proc.stdin.flush()
        trusted, lost, left = self.expect("state", timeout)
        return HolderState(trusted == "1", lost == "1", float(left))

    def kill(self) -> None:
        """SIGKILL and reap."""
        self.proc.kill()
        self.proc.wait(10)

    def pause(self) -> None:
        """SIGSTOP; returns once the process is stopped."""
        os.kill(self.pid, signal.SIGSTOP)
        wait_for(lambda: _state(self.pid) == "T", 5, "holder stopped")

    def resume(self) -> None:
        os.kill(self.pid, signal.SIGCONT)
        wait_for(lambda: _state(self.pid) not in ("T", None), 5, "holder running")

    def close(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.pid, signal.SIGCONT)
            self.proc.kill()
        self.proc.wait(10)
        self._reader.join(5)  # it reads to EOF, then the pipe may be closed
        for f in (self.proc.stdin, self.proc.stdout):
            if f is not None:
                f.close()
        self._stderr.close()

    def tail(self) -> str:
        text = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
        return f"\n--- holder stderr ---\n{text}" if text else ""


def _state(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return None


@pytest.fixture
def holders(tmp_path: Path) -> Iterator[Callable[[str, str, float], Holder]]:
    """Start holder child processes; all are killed at teardown."""
    started: list[Holder] = []

    def start(url: str, node: str, ttl: float) -> Holder:
        h = Holder(url, node, ttl, tmp_path / f"holder-{len(started)}.log")
        started.append(h)
        return h

    yield start
    for h in started:
        h.close()
