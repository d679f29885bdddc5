"""A ``keepcount node`` as a child process: start it, await readiness, signal it.

Used by the system tests, the benchmarks and the cluster's supervisor.  A
``keepcount.process.ManagedProcess``: its exit is awaited (``wait``,
``await exited()``), its readiness by polling ``/readyz`` against a deadline,
never by a fixed sleep.  ``http_request`` / ``http_get`` are the tooling's
plain-HTTP calls to loopback servers (``keepcount.httpclient``).

Example::

    node = NodeProcess("node-1", "sqlite:////tmp/c.db", port=free_port())
    node.start()
    node.wait_ready(timeout=10)
    node.kill()            # SIGKILL; returns once reaped
    node.wait()            # -9
"""

from __future__ import annotations

import os
import random
import socket
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from keepcount import httpclient
from keepcount.node.config import NodeConfig
from keepcount.process import ManagedProcess

__all__ = ["NodeProcess", "free_port", "http_get", "http_request"]


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


def http_request(
    method: str,
    host: str,
    port: int,
    path: str,
    body: bytes | None = None,
    timeout: float = 2.0,
    headers: dict[str, str] | None = None,
) -> tuple[int, bytes]:
    """One plain-HTTP request to ``host:port``; (status, body) whatever the
    status.  Raises ``OSError`` if nothing answers (refused, reset, timed out:
    ``keepcount.httpclient.request``)."""
    return httpclient.request(
        method, f"http://{host}:{port}{path}", body=body, headers=headers, timeout=timeout
    )


def http_get(host: str, port: int, path: str, timeout: float = 2.0) -> tuple[int, bytes]:
    """One GET; (status, body).  Raises OSError if nothing answers."""
    return http_request("GET", host, port, path, timeout=timeout)


class NodeProcess(ManagedProcess):
    """One incarnation of ``keepcount node`` (``python -m keepcount.cli node``):
    a ``ManagedProcess`` (``keepcount.process``) whose readiness is ``/readyz``."""

    kind = "node"

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
        options: Sequence[str] | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        """``options``: the command's options in full, instead of the
        ``NodeConfig`` of ``node`` and ``store`` (``NodeConfig.to_argv()``),
        ``--listen`` built from the arguments, then ``extra``.  ``env``:
        variables added to this process's environment for the child (e.g.
        ``keepcount.cluster.clocks``' libfaketime preload)."""
        super().__init__(node, log)
        self.node = node
        self.store = store
        self.host = host
        self.port = port
        self.extra = list(extra)
        self.module = module
        self.command = list(command)
        self.options = None if options is None else list(options)
        self.env = dict(env or {})

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def argv(self) -> list[str]:
        options = self.options
        if options is None:
            config = NodeConfig(node=self.node, store=self.store)
            options = [*config.to_argv(), "--listen", f"{self.host}:{self.port}", *self.extra]
        return [sys.executable, "-m", self.module, *self.command, *options]

    def start(self) -> NodeProcess:
        self.spawn(self.argv(), env={**os.environ, **self.env} if self.env else None)
        return self

    def readyz(self) -> int | None:
        """``/readyz`` status, or None while nothing answers on the port."""
        try:
            return http_get(self.host, self.port, "/readyz", timeout=1.0)[0]
        except OSError:
            return None

    def wait_ready(self, timeout: float = 20.0) -> list[int | None]:
        """Poll ``/readyz`` until 200; return every status seen on the way
        (None: not listening yet).  ``ProcessExited`` (a ``RuntimeError``) if
        the process exits, ``TimeoutError`` if time runs out."""
        seen: list[int | None] = []

        def ready() -> bool:
            status = self.readyz()
            if not seen or seen[-1] != status:
                seen.append(status)
            return status == 200

        try:
            self.wait_until(ready, timeout, interval=0.005)
        except TimeoutError as exc:
            raise TimeoutError(f"{exc} (saw {seen})") from None
        return seen
