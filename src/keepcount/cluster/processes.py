"""A server process the cluster tooling owns: spawn, signal, reap, read its log.

``ServerProcess`` is what an etcd member and a ZooKeeper server have in
common (``keepcount.cluster.etcd``, ``keepcount.cluster.zookeeper``): one
``Popen`` at a time, a log file that collects every incarnation's output,
and fault verbs that return only once the kernel shows their effect.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["ServerProcess", "check_ports_free", "process_state", "saved_identity"]


def process_state(pid: int) -> str | None:
    """The kernel's one-letter state of ``pid`` (R, S, T for stopped, Z, ...);
    None once it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may contain spaces.
    return stat.rsplit(")", 1)[1].split()[0]


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
    deadline = time.monotonic() + wait
    for host, port in endpoints:
        while True:
            with socket.socket() as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    s.bind((host, port))
                    break
                except OSError as exc:
                    if time.monotonic() > deadline:
                        raise OSError(
                            f"port {port} on {host}, which the data in {owner} was saved "
                            f"with, is in use ({exc}): is that cluster already running?"
                        ) from None
            time.sleep(0.2)  # poll interval


class ServerProcess:
    """One server process; its ports, data and log outlive the process."""

    kind = "server"
    """How messages name it ("etcd member", "ZooKeeper")."""

    def __init__(self, name: str, log: Path) -> None:
        self.name = name
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise RuntimeError(f"{self.kind} {self.name} was never started")
        return self.proc.pid

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def spawn(self, argv: Sequence[str], note: str = "") -> None:
        """Start ``argv`` with its output appended to the log, after a banner."""
        if self.running():
            raise RuntimeError(f"{self.kind} {self.name} is already running (pid {self.pid})")
        with open(self.log, "ab") as out:
            out.write(f"=== {time.strftime('%H:%M:%S')} start{note} ===\n".encode())
            out.flush()
            self.proc = subprocess.Popen(
                list(argv), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )

    def kill(self, timeout: float = 10.0) -> None:
        """SIGKILL and reap (its ports are then free to reuse)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)  # a stopped process dies on SIGKILL anyway
            self.proc.kill()
        self.proc.wait(timeout)

    def pause(self, timeout: float = 5.0) -> None:
        """SIGSTOP; returns once the kernel shows it stopped."""
        self._signal_until(signal.SIGSTOP, lambda s: s == "T", "stopped", timeout)

    def resume(self, timeout: float = 5.0) -> None:
        """SIGCONT; returns once it runs again."""
        self._signal_until(signal.SIGCONT, lambda s: s not in ("T", None), "running", timeout)

    def _signal_until(
        self, sig: int, done: Callable[[str | None], bool], what: str, timeout: float
    ) -> None:
        if not self.running():
            raise RuntimeError(f"{self.kind} {self.name} is not running")
        os.kill(self.pid, sig)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if done(process_state(self.pid)):
                return
            time.sleep(0.002)  # poll interval of a bounded wait for the kernel's state
        raise TimeoutError(f"{self.kind} {self.name} not {what} within {timeout} s")

    def log_tail(self, chars: int = 3000) -> str:
        if not self.log.exists():
            return ""
        return self.log.read_text(errors="replace")[-chars:]
