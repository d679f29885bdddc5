"""A ``keepcount node`` as a child process: start it, await readiness, signal it.

Used by the system tests, the benchmarks and (later) the cluster tooling.
Readiness is awaited by polling ``/readyz`` against a deadline, never by a
fixed sleep.

Example::

    node = NodeProcess("node-1", "sqlite:////tmp/c.db", port=free_port())
    node.start()
    node.wait_ready(timeout=10)
    node.kill()            # SIGKILL
    node.wait()
"""

from __future__ import annotations

import http.client
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

__all__ = ["NodeProcess", "free_port", "http_get"]


_HANDED_OUT: set[int] = set()
_LOW_PORT = 10000


def _ephemeral_range() -> tuple[int, int]:
    try:
        lo, hi = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(lo), int(hi)
    except (OSError, ValueError):
        return 32768, 60999


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now, below the kernel's ephemeral
    range, and not handed out before by this process.

    Not the kernel's pick (``bind(0)``): that comes from the ephemeral range,
    from which every outgoing connection also takes its local port — a port
    picked that way for a server started a moment later was, once in a CI
    run, taken by a client connection in between ("Address already in use")."""
    lo, _ = _ephemeral_range()
    if lo - _LOW_PORT >= 1000:
        for _ in range(200):
            port = random.randrange(_LOW_PORT, lo)
            if port in _HANDED_OUT:
                continue
            with socket.socket() as s:
                try:
                    s.bind((host, port))
                except OSError:
                    continue
            _HANDED_OUT.add(port)
            return port
    with socket.socket() as s:  # no room below the ephemeral range: the kernel's pick
        s.bind((host, 0))
        picked: int = s.getsockname()[1]
    _HANDED_OUT.add(picked)
    return picked


def http_get(host: str, port: int, path: str, timeout: float = 2.0) -> tuple[int, bytes]:
    """One GET; (status, body).  Raises OSError if nothing answers."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


class NodeProcess:
    """One incarnation of ``keepcount node`` (``python -m keepcount.cli node``)."""

    def __init__(
        self,
        node: str,
        store: str,
        *,
        port: int,
        host: str = "127.0.0.1",
        extra: Sequence[str] = (),
        log: Path | None = None,
        module: str = "keepcount.cli",
        command: Sequence[str] = ("node",),
    ) -> None:
        self.node = node
        self.store = store
        self.host = host
        self.port = port
        self.extra = list(extra)
        self.log = log
        self.module = module
        self.command = list(command)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def argv(self) -> list[str]:
        return [
            sys.executable, "-m", self.module, *self.command,
            "--id", self.node, "--store", self.store,
            "--listen", f"{self.host}:{self.port}", *self.extra,
        ]  # fmt: skip

    def start(self) -> NodeProcess:
        out = subprocess.DEVNULL if self.log is None else open(self.log, "ab")  # noqa: SIM115
        try:
            self.proc = subprocess.Popen(
                self.argv(), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        finally:
            if self.log is not None:
                out.close()  # type: ignore[union-attr]
        return self

    def readyz(self) -> int | None:
        """``/readyz`` status, or None while nothing answers on the port."""
        try:
            return http_get(self.host, self.port, "/readyz", timeout=1.0)[0]
        except OSError:
            return None

    def wait_ready(self, timeout: float = 20.0) -> list[int | None]:
        """Poll ``/readyz`` until 200; return every status seen on the way
        (None: not listening yet).  Raises if the process exits or time runs out."""
        assert self.proc is not None
        seen: list[int | None] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            code = self.proc.poll()
            if code is not None:
                raise RuntimeError(
                    f"node {self.node} exited with {code} before it was ready{self.log_tail()}"
                )
            status = self.readyz()
            if not seen or seen[-1] != status:
                seen.append(status)
            if status == 200:
                return seen
            time.sleep(0.005)  # poll interval, not synchronisation: the loop awaits /readyz
        raise TimeoutError(
            f"node {self.node} not ready within {timeout} s (saw {seen}){self.log_tail()}"
        )

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)

    def terminate(self) -> None:
        self.signal(signal.SIGTERM)

    def wait(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self) -> None:
        """Make sure it is gone (test teardown)."""
        if self.proc is not None and self.proc.poll() is None:
            self.kill()
            self.proc.wait(10)

    def log_tail(self) -> str:
        if self.log is None or not self.log.exists():
            return ""
        return "\n--- node log ---\n" + self.log.read_text(errors="replace")[-3000:]
