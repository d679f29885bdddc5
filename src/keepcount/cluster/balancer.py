"""The load balancer in front of a local cluster's nodes: the shared seam.

A ``LoadBalancer`` is a real HAProxy or NGINX process, configured from a list
of ``Backend`` servers and started, probed and stopped from Python.  Two
implementations: ``keepcount.cluster.haproxy.HAProxy`` and
``keepcount.cluster.nginx.Nginx``, both importing this module;
``keepcount.cluster.balancers.make_balancer`` picks one by name.

Example::

    from keepcount.cluster.balancer import Backend
    from keepcount.cluster.balancers import make_balancer

    backends = [Backend("node-1.a", "127.0.0.1", 8101), Backend("node-1.b", "127.0.0.1", 8102)]
    lb = make_balancer("haproxy", "/tmp/lb", 8100, backends)
    lb.start()
    lb.wait_ready(timeout=10)
    print(lb.url, lb.backend_states())     # http://127.0.0.1:8100 {'node-1.a': 'UP', ...}
    lb.stop()

Contract shared by both:

- Everything binds 127.0.0.1; config, sockets and logs live under the given
  directory.  ``start()`` validates the generated config with the binary
  first (``BalancerConfigError`` carries its message) and raises
  ``BalancerNotInstalled`` naming the install command when the binary is
  missing.
- A request with an ``Idempotency-Key`` is routed by a consistent hash of
  the key (the same node while it is up) and, when its node fails
  (connection refused or reset, no answer in time, a 503), is replayed on
  another node: safe, because the key makes the node count it once
  store-wide.  A POST without a key is never replayed once it may have
  reached a node (its outcome is unknown to the client, not the balancer's
  to guess); a failed *connection* is retried for every request, since
  nothing was sent.  Requests without a key are spread round robin.
- ``stop()`` returns once the process (and its workers) are gone and reaped
  (``BalancerProcess``, a ``keepcount.process.ManagedProcess``).

Errors (all ``KeepcountError``)::

    BalancerError
    ├── BalancerNotInstalled   the binary is missing (message: the apt-get command)
    └── BalancerConfigError    the binary refused the generated config (its message)
"""

from __future__ import annotations

import re
import shutil
import signal
import socket
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Self, runtime_checkable

from keepcount.errors import KeepcountError
from keepcount.nodeproc import free_port
from keepcount.process import ManagedProcess, ProcessExited

__all__ = [
    "Backend",
    "BalancerError",
    "BalancerConfigError",
    "BalancerNotInstalled",
    "BalancerProcess",
    "KINDS",
    "Listen",
    "LoadBalancer",
    "ProcessBalancer",
    "find_binary",
    "parse_listen",
]

KINDS = ("haproxy", "nginx")

# Server names end up in config files and in HAProxy's runtime commands
# ("set server keepcount/<name> ..."): HAProxy's own identifier alphabet, which
# also keeps NGINX config comments and CLI arguments free of quoting problems.
_NAME = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
# An IPv4 literal or a DNS name: nothing that could end a config statement.
_HOST = re.compile(r"[A-Za-z0-9.-]{1,253}")


class BalancerError(KeepcountError):
    """A load balancer could not be configured, started, queried or stopped."""

    code = "balancer_error"


class BalancerNotInstalled(BalancerError):
    """The HAProxy / NGINX binary is missing; the message names the install command."""

    code = "balancer_not_installed"


class BalancerConfigError(BalancerError):
    """The binary refused the generated configuration (``haproxy -c`` /
    ``nginx -t``); the message carries what it said and the config's path."""

    code = "balancer_config_error"


@dataclass(frozen=True)
class Backend:
    """One server slot behind the balancer: a name (``node-1.a``) and an address.

    The cluster gives every node id two slots (``.a`` and ``.b``, two ports):
    a restarted incarnation takes whichever is free, since a SIGSTOPped old one
    may still hold its port.  So one slot of each id usually refuses
    connections, and both balancer configs make that cost nothing.
    """

    name: str
    host: str
    port: int

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME.fullmatch(self.name):
            raise BalancerConfigError(
                f"invalid backend name {self.name!r}: 1-64 of A-Z a-z 0-9 _ . : -"
            )
        if not isinstance(self.host, str) or not _HOST.fullmatch(self.host):
            raise BalancerConfigError(
                f"invalid backend host {self.host!r}: an IPv4 address or DNS name"
            )
        if type(self.port) is not int or not 0 < self.port < 65536:
            raise BalancerConfigError(f"invalid backend port {self.port!r}")

    @property
    def address(self) -> str:
        """``host:port``, as both balancers write (and NGINX logs) it."""
        return f"{self.host}:{self.port}"


def check_backends(backends: Sequence[Backend]) -> list[Backend]:
    """The backends as a list; refuses none, duplicate names or duplicate addresses
    (a duplicate address would weigh one node twice in the consistent hash)."""
    out = list(backends)
    if not out:
        raise BalancerConfigError("a load balancer needs at least one backend")
    for what, values in (("name", [b.name for b in out]), ("address", [b.address for b in out])):
        dup = sorted({v for v in values if values.count(v) > 1})
        if dup:
            raise BalancerConfigError(f"duplicate backend {what}(s): {', '.join(dup)}")
    return out


Listen = int | str | tuple[str, int] | None
"""The front address: a port, ``"HOST:PORT"``, ``(host, port)``, or None (a free port)."""


def parse_listen(listen: Listen) -> tuple[str, int]:
    """``(host, port)`` for the front address: a port, ``"HOST:PORT"``,
    ``(host, port)``, or None for a free port on 127.0.0.1 (the kernel picks it)."""
    if listen is None:
        return "127.0.0.1", free_port()
    if isinstance(listen, tuple):
        host, port = listen
        if not isinstance(host, str) or type(port) is not int:
            raise BalancerConfigError(f"invalid listen address {listen!r}")
    elif isinstance(listen, int):
        host, port = "127.0.0.1", listen
    else:
        host, sep, rest = listen.rpartition(":")
        if not sep:
            host, rest = "127.0.0.1", listen
        if not rest.isdigit():
            raise BalancerConfigError(f"invalid listen address {listen!r}: PORT or HOST:PORT")
        port = int(rest)
    if not _HOST.fullmatch(host) or not 0 < port < 65536:
        raise BalancerConfigError(f"invalid listen address {listen!r}")
    return host, port


def find_binary(name: str, package: str, explicit: str | None = None) -> str:
    """The path of ``name`` (or of ``explicit``); ``BalancerNotInstalled`` names
    the apt-get command when it is missing.  /usr/sbin is searched too: it is
    not on every user's PATH."""
    if explicit is not None:
        found = shutil.which(explicit)
    else:
        found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/local/sbin")
    if found is None:
        raise BalancerNotInstalled(
            f"{explicit or name} not found (PATH and /usr/sbin searched); "
            f"install it with: apt-get install -y {package}"
        )
    return found


@runtime_checkable
class LoadBalancer(Protocol):
    """A load balancer process in front of keepcount nodes.

    ``start()`` writes and validates the config, then launches the process
    (it returns at once).  ``wait_ready(timeout)`` returns once the front
    address accepts connections and the status interface answers; it raises
    ``BalancerError`` if the process exited and ``TimeoutError`` when time runs
    out (both with the log's tail).  ``backend_states()`` maps every backend
    name to the balancer's current opinion of it (``"UP"``, ``"DOWN"``,
    ``"MAINT"``, ``"DRAIN"``; see each implementation for what it can know).
    ``stop()`` is idempotent and returns once the process is reaped.
    """

    @property
    def kind(self) -> str:
        """``"haproxy"`` or ``"nginx"``."""
        ...

    @property
    def url(self) -> str:
        """The front address, ``http://127.0.0.1:PORT``."""
        ...

    @property
    def log(self) -> Path:
        """The process's log file (its stderr)."""
        ...

    def start(self) -> LoadBalancer: ...

    def wait_ready(self, timeout: float = 10.0) -> None: ...

    def backend_states(self) -> dict[str, str]: ...

    def stop(self, timeout: float = 10.0) -> None: ...


def tcp_accepts(host: str, port: int, timeout: float = 0.5) -> bool:
    """True if something accepts a TCP connection on host:port right now."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def run_check(argv: Sequence[str], what: str, config: Path) -> None:
    """Run a config check (``haproxy -c`` / ``nginx -t``); ``BalancerConfigError``
    with its output if it fails."""
    done = subprocess.run(
        argv, capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL
    )
    if done.returncode != 0:
        said = (done.stderr + done.stdout).strip()
        raise BalancerConfigError(f"{what} refused the generated config {config}:\n{said}")


class BalancerProcess(ManagedProcess):
    """The OS process of a balancer: a ``ManagedProcess`` (``keepcount.process``)
    in a session of its own, so that ``stop`` also kills what is left of it (a
    SIGKILLed NGINX master leaves its workers serving the port).  An exit
    while it is awaited ready is a ``BalancerError``."""

    kind = ""

    def __init__(self, argv: Sequence[str], log: Path, what: str) -> None:
        super().__init__(what, log, new_session=True)
        self.argv = list(argv)

    def start(self) -> None:
        self.spawn(self.argv)

    def check_alive(self) -> None:
        try:
            super().check_alive()
        except ProcessExited as exc:
            raise BalancerError(str(exc)) from None


class ProcessBalancer:
    """What ``HAProxy`` and ``Nginx`` do alike: the front address and backends
    (checked), the ``BalancerProcess``, readiness, stop, log, ``with``.

    A subclass sets ``kind``, ``graceful_signal`` and ``log``, writes its
    config and calls ``_launch(argv)`` in ``start()``, and says in
    ``_answers()`` whether its status interface answers.
    """

    kind = "balancer"
    graceful_signal: int = signal.SIGTERM
    """What ``stop(graceful=True)`` sends first (SIGTERM otherwise)."""
    log: Path

    def __init__(self, directory: Path, listen: Listen, backends: Sequence[Backend]) -> None:
        self.directory = directory
        self.listen = parse_listen(listen)
        self.backends = check_backends(backends)
        self._proc: BalancerProcess | None = None

    @property
    def url(self) -> str:
        return f"http://{self.listen[0]}:{self.listen[1]}"

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise BalancerError(f"{self.kind} was not started")
        return self._proc.pid

    def _check_stopped(self) -> None:
        if self._proc is not None and self._proc.running():
            raise BalancerError(f"{self.kind} is already running (pid {self._proc.pid})")

    def _launch(self, argv: Sequence[str]) -> None:
        self._proc = BalancerProcess(argv, self.log, self.kind)
        self._proc.start()

    def _answers(self) -> bool:
        """Whether the status interface answers (the process is up)."""
        raise NotImplementedError

    def wait_ready(self, timeout: float = 10.0) -> None:
        """Until the front address accepts TCP and the status interface answers."""
        if self._proc is None:
            raise BalancerError(f"{self.kind} was not started")
        self._proc.wait_until(lambda: tcp_accepts(*self.listen) and self._answers(), timeout)

    def stop(self, timeout: float = 10.0, *, graceful: bool = False) -> None:
        """SIGTERM (or ``graceful_signal`` if ``graceful``), SIGKILL after
        ``timeout``; reaped, and what is left of its session killed."""
        if self._proc is not None:
            sig = self.graceful_signal if graceful else signal.SIGTERM
            self._proc.stop(timeout, graceful=True, sig=sig)

    def log_tail(self, chars: int = 3000) -> str:
        return "" if self._proc is None else self._proc.log_tail(chars)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
