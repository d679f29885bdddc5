"""The load balancer in front of a local cluster's nodes: the shared seam.

A ``LoadBalancer`` is a real HAProxy or NGINX process, configured from a list
of ``Backend`` servers and started, probed and stopped from Python.  Two
implementations: ``keepcount.cluster.haproxy.HAProxy`` and
``keepcount.cluster.nginx.Nginx``; ``make_balancer`` picks one by name.

Example::

    from keepcount.cluster.balancer import Backend, make_balancer

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
- ``stop()`` returns once the process (and its workers) are gone and reaped.

Errors (all ``KeepcountError``)::

    BalancerError
    ├── BalancerNotInstalled   the binary is missing (message: the apt-get command)
    └── BalancerConfigError    the binary refused the generated config (its message)
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from keepcount.errors import KeepcountError
from keepcount.nodeproc import free_port

__all__ = [
    "Backend",
    "BalancerError",
    "BalancerConfigError",
    "BalancerNotInstalled",
    "BalancerProcess",
    "KINDS",
    "Listen",
    "LoadBalancer",
    "find_binary",
    "make_balancer",
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


def make_balancer(
    kind: str,
    directory: str | os.PathLike[str],
    listen: Listen,
    backends: Sequence[Backend],
    **opts: Any,
) -> LoadBalancer:
    """An unstarted ``HAProxy`` or ``Nginx`` (``kind`` ``"haproxy"`` / ``"nginx"``);
    ``opts`` go to its settings dataclass (unknown names raise ``TypeError``)."""
    if kind == "haproxy":
        from keepcount.cluster.haproxy import HAProxy

        return HAProxy(directory, listen, backends, **opts)
    if kind == "nginx":
        from keepcount.cluster.nginx import Nginx

        return Nginx(directory, listen, backends, **opts)
    raise BalancerConfigError(f"unknown load balancer {kind!r}: expected one of {', '.join(KINDS)}")


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


class BalancerProcess:
    """The OS process of a balancer: launch, liveness, log tail, stop with escalation.

    Launched in a session of its own, so that what is left of it can be found
    and killed: a SIGKILLed NGINX master leaves its workers serving the port.
    """

    def __init__(self, argv: Sequence[str], log: Path, what: str) -> None:
        self.argv = list(argv)
        self.log = log
        self.what = what
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise BalancerError(f"{self.what} was not started")
        return self.proc.pid

    def start(self) -> None:
        if self.running():
            raise BalancerError(f"{self.what} is already running (pid {self.pid})")
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                self.argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def check_alive(self) -> None:
        """``BalancerError`` with the log's tail if the process has exited."""
        if self.proc is None:
            raise BalancerError(f"{self.what} was not started")
        code = self.proc.poll()
        if code is not None:
            raise BalancerError(f"{self.what} exited with {code}{self.log_tail()}")

    def signal(self, sig: int) -> None:
        if self.running():
            os.kill(self.pid, sig)

    def stop(self, first: int, timeout: float) -> None:
        """Send ``first``; SIGKILL it if it is not gone by ``timeout``; reap it;
        then SIGKILL whatever of its session is left (NGINX workers whose
        master died).  Idempotent."""
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            os.kill(proc.pid, first)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        for pid in session_members(proc.pid, Path(self.argv[0]).name):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def log_tail(self, chars: int = 3000) -> str:
        if not self.log.exists():
            return ""
        return f"\n--- {self.log} ---\n" + self.log.read_text(errors="replace")[-chars:]


def session_members(sid: int, exe: str) -> list[int]:
    """Processes of session ``sid`` running ``exe`` (by /proc): what is left of
    a balancer we started in a session of its own."""
    out: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            name = os.readlink(entry / "exe")
        except OSError:  # gone meanwhile, or not ours to read
            continue
        # Fields after the ")" closing the command name: state ppid pgrp session ...
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[3]) == sid and Path(name.removesuffix(" (deleted)")).name == exe:
            out.append(int(entry.name))
    return out


def poll_until_ready(
    proc: BalancerProcess, probe: Callable[[], bool], timeout: float, what: str
) -> None:
    """Call ``probe()`` until it returns True, while ``proc`` lives, for at
    most ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        proc.check_alive()
        if probe():
            return
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{what} not ready within {timeout} s{proc.log_tail()}")
        time.sleep(0.01)  # poll interval: the loop waits for the probe, not for time
