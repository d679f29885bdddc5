"""The servers the cluster tooling owns: what they share beyond ``ManagedProcess``.

``ServerProcess`` is an etcd member, a ZooKeeper server, a Cassandra node or
the Bigtable emulator (``keepcount.cluster.etcd``, ...): a ``ManagedProcess``
(``keepcount.process``: one ``Popen`` at a time, a log file that collects every
incarnation's output, fault verbs that return once their effect is seen)
whose ports and data outlive it.  ``ServerGroup`` and ``kill_all`` drive
the members of a cluster of them; ``saved_identity`` and ``check_ports_free``
let a data directory start again on the ports it was made with.
"""

from __future__ import annotations

import json
import signal
import socket
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import Any, Generic, Self, TypeVar

from keepcount.process import ManagedProcess, poll_until, process_state

__all__ = [
    "ServerGroup",
    "ServerProcess",
    "check_ports_free",
    "kill_all",
    "process_state",
    "saved_identity",
]

_P = TypeVar("_P", bound="ServerProcess")


def saved_identity(
    path: Path, what: str, asked: Mapping[str, Any], fresh: Callable[[], Mapping[str, Any]]
) -> dict[str, Any]:
    """What a server's data directory was made with (its name, ports): read
    from ``path`` if it is there, else ``fresh()``, written to ``path``.
    ``asked`` holds every key, with the value the caller asks for (None:
    any); a saved value that differs is refused (``what`` names the server).

    A data directory belongs to one cluster: etcd finds its peers by the URLs
    its data was saved with, Cassandra refuses data saved under another
    cluster name.  Keeping them lets ``keepcount cluster up`` start the same
    directory again after ``down``, with its claims' epochs and its counters.
    Raises ``ValueError`` naming the file if it is unreadable."""
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        doc = dict(fresh())
        path.write_text(json.dumps(doc) + "\n")
        return doc
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path} is unreadable ({exc}): remove the directory") from None
    if not isinstance(doc, dict) or not asked.keys() <= doc.keys():
        raise ValueError(f"{path} is not what keepcount wrote: remove the directory")
    for key, value in asked.items():
        if value is not None and doc[key] != value:
            raise ValueError(
                f"{path.parent} holds {what} with {key} {doc[key]!r}, not {value!r}: "
                "use another directory"
            )
    return doc


def check_ports_free(endpoints: Iterable[tuple[str, int]], owner: Path, wait: float = 15.0) -> None:
    """Raise ``OSError``, naming the port, if another process listens on one
    of ``endpoints`` (the ports the data in ``owner`` was saved with) after
    ``wait`` seconds: a cluster just stopped may still be closing.
    Connections in TIME_WAIT do not count (servers bind with SO_REUSEADDR)."""
    for host, port in endpoints:
        try:
            poll_until(partial(_bindable, host, port), wait, f"port {port}", interval=0.2)
        except TimeoutError:
            raise OSError(
                f"port {port} on {host}, which the data in {owner} was saved with, "
                "is in use: is that cluster already running?"
            ) from None


def _bindable(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def kill_all(servers: Iterable[ManagedProcess], timeout: float = 10.0) -> None:
    """SIGKILL every one of ``servers`` at once, then reap them all."""
    servers = list(servers)
    for server in servers:
        server.signal(signal.SIGCONT)  # a stopped process dies on SIGKILL anyway
        server.signal(signal.SIGKILL)
    for server in servers:
        if server.proc is not None:
            server.wait(timeout)


class ServerProcess(ManagedProcess):
    """One server process; its ports, data and log outlive the process.

    A ``ManagedProcess`` whose log is a file: ``kill`` reaps, ``pause`` and
    ``resume`` return once the kernel shows their effect."""

    kind = "server"

    def __init__(self, name: str, log: Path) -> None:
        super().__init__(name, log)
        self.log: Path = log

    @property
    def address(self) -> str:
        """Where it serves (``host:port``, or its host), for messages."""
        return ""


class ServerGroup(Generic[_P]):
    """What a local cluster of servers (etcd, ZooKeeper, Cassandra) does the
    same way: fault verbs on member ``i`` that return once their effect is
    seen, ``stop`` (SIGKILL them all, reaped), ``logs`` for assertion
    messages, and ``with`` (``start`` on entry, ``stop`` on exit).

    A subclass sets ``members`` and ``label`` and defines ``start``.
    """

    label = "server"
    """How ``logs`` names a member ("etcd", "Cassandra")."""
    members: Sequence[_P]
    stop_timeout = 10.0
    """Seconds ``stop`` waits for each member to be reaped."""

    def start(self, timeout: float = 30.0) -> Self:
        raise NotImplementedError

    def running(self) -> list[int]:
        """Indices of members whose process exists (paused ones included)."""
        return [i for i, m in enumerate(self.members) if m.running()]

    def wait_members(
        self,
        which: Iterable[int] | None,
        ready: Callable[[_P], bool],
        timeout: float,
        state: str,
        *,
        interval: float = 0.02,
    ) -> None:
        """Return once ``ready(member)`` held for each member of ``which``
        (default: the running ones), each probed until it does;
        ``RuntimeError`` at once if one exits, ``TimeoutError`` naming those
        not yet ``state``; both with the logs."""
        indices = sorted(set(which if which is not None else self.running()))
        pending = [self.members[i] for i in indices]

        def all_ready() -> bool:
            for m in list(pending):
                if m.returncode is not None:
                    raise RuntimeError(f"{m.what} exited with {m.returncode}\n{self.logs()}")
                if ready(m):
                    pending.remove(m)
            return not pending

        try:
            poll_until(all_ready, timeout, self.label, interval=interval)
        except TimeoutError:
            names = [m.name for m in pending]
            raise TimeoutError(
                f"{self.label} {names} not {state} within {timeout} s\n{self.logs()}"
            ) from None

    def find(self, pred: Callable[[_P], bool], timeout: float, what: str) -> int:
        """The index of the first running member for which ``pred`` holds,
        polled until there is one (a leader being elected, say);
        ``TimeoutError("no <what> ...")`` with the logs otherwise."""
        found: list[int] = []

        def any_found() -> bool:
            found[:] = [i for i in self.running() if pred(self.members[i])][:1]
            return bool(found)

        try:
            poll_until(any_found, timeout, what, interval=0.02)
        except TimeoutError:
            raise TimeoutError(f"no {what} within {timeout} s\n{self.logs()}") from None
        return found[0]

    def kill(self, i: int = 0) -> None:
        """SIGKILL member ``i`` and reap it (a crash: nothing is flushed)."""
        self.members[i].kill()

    def pause(self, i: int = 0) -> None:
        """SIGSTOP member ``i``; returns once the kernel shows it stopped."""
        self.members[i].pause()

    def resume(self, i: int = 0) -> None:
        """SIGCONT member ``i``; returns once it runs again (not once its
        peers count it again: each cluster has its own wait for that)."""
        self.members[i].resume()

    def pause_all(self) -> None:
        for i in self.running():
            self.pause(i)

    def resume_all(self) -> None:
        for i in self.running():
            self.resume(i)

    def stop(self) -> None:
        """SIGKILL every member and reap them all; idempotent."""
        kill_all(self.members, self.stop_timeout)

    def logs(self, chars: int = 3000) -> str:
        """The tail of every member's log, labelled (for assertion messages)."""
        parts = []
        for m in self.members:
            state = "paused" if m.stopped() else "running" if m.running() else "down"
            parts.append(
                f"--- {self.label} {m.name} ({m.address}, {state}) ---\n{m.log_text(chars)}"
            )
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
