"""HAProxy 2.6 in front of keepcount nodes: config, process, runtime API.

Example::

    from keepcount.cluster.balancer import Backend
    from keepcount.cluster.haproxy import HAProxy

    lb = HAProxy("/tmp/lb", 8100, [Backend("node-1.a", "127.0.0.1", 8101),
                                   Backend("node-1.b", "127.0.0.1", 8102)])
    lb.start().wait_ready(timeout=10)
    lb.backend_states()                    # {'node-1.a': 'UP', 'node-1.b': 'DOWN'}
    lb.set_server_state("node-1.a", "drain")
    lb.stop()

Contract (``keepcount.cluster.balancer`` has the part both balancers share):

- ``haproxy -f <dir>/haproxy.cfg -db``: foreground, no daemon, its stderr
  (warnings and server state changes) appended to ``<dir>/haproxy.log``.
  The config is checked with ``haproxy -c`` before every start.
- Active health checks: ``GET /readyz`` must answer 200, so a node that is
  restoring, waiting for its claim, fenced or gone is DOWN and gets nothing.
- The runtime API (``stats socket <dir>/haproxy.sock``, level admin) is
  spoken from Python over the UNIX socket: ``show_stat()``,
  ``backend_states()``, ``set_server_state()``, ``command()``.
- ``stop()`` sends SIGTERM (HAProxy's hard stop: it closes at once), then
  SIGKILL after the deadline; ``stop(graceful=True)`` sends SIGUSR1 (soft
  stop: finish what is in flight).
"""

from __future__ import annotations

import csv
import os
import shutil
import signal
import socket
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from keepcount.cluster.balancer import (
    Backend,
    BalancerError,
    Listen,
    ProcessBalancer,
    find_binary,
    run_check,
)

__all__ = ["BACKEND", "HAProxy", "HAProxySettings", "render_config"]

BACKEND = "keepcount"
"""The name of the backend section (``show stat`` rows, ``set server keepcount/<name>``)."""

FRONTEND = "keepcount_front"

# sun_path is 108 bytes on Linux; a longer socket path cannot be bound.
_MAX_SOCKET_PATH = 100


@dataclass(frozen=True)
class HAProxySettings:
    """Timeouts and check cadence (seconds), with the reasoning for each default.

    ``connect_timeout``: on loopback a refused connection fails at once, so this
    only matters for a host that drops SYNs; short, so a retry goes elsewhere
    quickly.  ``server_timeout``: longest wait for a node's answer; an answer
    is sent only once the increment is durable (a group commit is a few ms),
    so 2 s is generous, yet a SIGSTOPped node is abandoned (and a keyed
    request retried elsewhere, ``retry-on response-timeout``) after 2 s.
    ``check_*``, ``fall``, ``rise``: docs/infra.md measured DOWN 0.3-0.4 s after a
    kill and UP 0.4 s after ready with inter 200ms fall 2 rise 2.
    ``check_timeout``: a loaded node may answer ``/readyz`` late; 1 s avoids
    marking a busy node DOWN while still catching a SIGSTOPped one in ~2.5 s.
    ``observe_layer4``: a failed connection in live traffic marks the server
    DOWN at once (``observe layer4 error-limit 1 on-error mark-down``) rather
    than after ``fall`` checks.  ``threads``: one is plenty on loopback, and
    the nodes need the cores.
    """

    connect_timeout: float = 0.3
    server_timeout: float = 2.0
    client_timeout: float = 30.0
    check_timeout: float = 1.0
    check_inter: float = 0.2
    check_fastinter: float = 0.1
    check_downinter: float = 0.2
    fall: int = 2
    rise: int = 2
    retries: int = 3
    observe_layer4: bool = True
    threads: int = 1
    maxconn: int = 4096
    binary: str | None = None

    def __post_init__(self) -> None:
        for name in ("connect_timeout", "server_timeout", "client_timeout", "check_timeout",
                     "check_inter", "check_fastinter", "check_downinter"):  # fmt: skip
            value = getattr(self, name)
            if not isinstance(value, int | float) or not value >= 0.001:
                raise BalancerError(f"{name} must be at least 0.001 s, not {value!r}")
        for name in ("fall", "rise", "threads", "maxconn"):
            if type(getattr(self, name)) is not int or getattr(self, name) < 1:
                raise BalancerError(f"{name} must be a positive integer")
        if type(self.retries) is not int or self.retries < 0:
            raise BalancerError("retries must be a non-negative integer")


def _ms(seconds: float) -> str:
    return f"{max(1, round(seconds * 1000))}ms"


def _quote(text: str) -> str:
    """A config word.  HAProxy expands ``$VAR`` and backslashes inside double
    quotes and nothing inside single quotes, so single quotes when needed."""
    if text and all(c.isalnum() or c in "/._-:@+" for c in text):
        return text
    if "'" in text or any(ord(c) < 32 for c in text):
        raise BalancerError(
            f"cannot write {text!r} into an HAProxy config (quote or control character)"
        )
    return f"'{text}'"


def render_config(
    listen: tuple[str, int],
    backends: list[Backend],
    stats_socket: Path,
    settings: HAProxySettings,
) -> str:
    """The whole ``haproxy.cfg``: a pure function of its inputs (unit-tested)."""
    s = settings
    observe = " observe layer4 error-limit 1 on-error mark-down" if s.observe_layer4 else ""
    servers = "\n".join(f"    server {b.name} {b.address} check" for b in backends)
    return f"""\
# Generated by keepcount.cluster.haproxy: edits are overwritten at the next start.
global
    maxconn {s.maxconn}
    nbthread {s.threads}
    # The runtime API, spoken from Python (no socat here): show stat, set server.
    stats socket {_quote(str(stats_socket))} mode 600 level admin
    stats timeout 10s
    # No "daemon": run with -db.  Warnings and server state changes go to
    # stderr, and so do the logs of abnormal requests only (dontlog-normal
    # below): few lines even under load (docs/infra.md: "log stderr" dropped lines
    # under load when every request was logged), each one explaining an error
    # a client saw (its termination state, retries, server).
    log stderr format raw local0 info

defaults
    mode http
    log global
    option httplog
    option dontlog-normal
    option dontlognull
    timeout connect {_ms(s.connect_timeout)}
    timeout client {_ms(s.client_timeout)}
    timeout server {_ms(s.server_timeout)}
    timeout http-request 5s
    timeout http-keep-alive 10s
    timeout queue 2s
    timeout check {_ms(s.check_timeout)}
    # Wait for the whole body before choosing a server, so that a retry can
    # replay it.  docs/infra.md: POSTs to a backend that died failed in 14 of 27
    # runs without it, 0 in 16,000 requests with it.
    option http-buffer-request
    retries {s.retries}
    # Every retry goes to another server, not back to the one that failed.
    option redispatch 1
    # L7 retries replay the request: safe only with an Idempotency-Key (see
    # the backend's disable-l7-retry), which makes a replay count at most
    # once.  503: the node did not acknowledge (not ready, fenced, store
    # unavailable, outcome unknown); another node may.
    retry-on conn-failure empty-response response-timeout 503
    # docs/infra.md: inter 200ms fall 2 rise 2 = DOWN 0.3-0.4 s after a kill, UP
    # 0.4 s after ready.  The unused slot of every node id stays DOWN and
    # costs one refused connection per {_ms(s.check_downinter)}.
    default-server inter {_ms(s.check_inter)} fastinter {_ms(s.check_fastinter)} downinter {_ms(s.check_downinter)} fall {s.fall} rise {s.rise}{observe}

frontend {FRONTEND}
    bind {listen[0]}:{listen[1]}
    default_backend {BACKEND}

backend {BACKEND}
    # The same key goes to the same node while it is up (its answer is then
    # replayed locally); without the header HAProxy falls back to round robin.
    balance hdr(Idempotency-Key)
    hash-type consistent
    # Restore before serve (DESIGN G3): only a ready node gets traffic.
    option httpchk GET /readyz
    http-check expect status 200
    # HAProxy's L7 retries replay POSTs (docs/infra.md).  A request that may count
    # (any method but GET/HEAD/OPTIONS) is replayed only with an
    # Idempotency-Key; a failed connection is still retried (nothing was sent).
    acl safe_method method GET HEAD OPTIONS
    acl keyed req.hdr(Idempotency-Key) -m found
    http-request disable-l7-retry if !safe_method !keyed
{servers}
"""


class HAProxy(ProcessBalancer):
    """An HAProxy process in front of ``backends`` (see the module docstring).

    Invariants: the config on disk is the one the running process was
    started with; ``url`` is fixed at construction (a free port if
    ``listen`` is None).
    """

    kind = "haproxy"
    graceful_signal = signal.SIGUSR1

    def __init__(
        self,
        directory: str | os.PathLike[str],
        listen: Listen,
        backends: Sequence[Backend],
        **settings: object,
    ) -> None:
        super().__init__(Path(directory), listen, backends)
        self.settings = HAProxySettings(**settings)  # type: ignore[arg-type]
        self.config = self.directory / "haproxy.cfg"
        self.log = self.directory / "haproxy.log"
        self._socket_dir: Path | None = None
        self.socket = self.directory / "haproxy.sock"
        if len(os.fsencode(self.socket)) > _MAX_SOCKET_PATH:
            # A deep test directory: put the socket in a short private dir instead.
            self._socket_dir = Path(tempfile.mkdtemp(prefix="kc-haproxy-"))
            self.socket = self._socket_dir / "haproxy.sock"

    def render(self) -> str:
        return render_config(self.listen, self.backends, self.socket, self.settings)

    def start(self) -> HAProxy:
        self._check_stopped()
        binary = find_binary("haproxy", "haproxy", self.settings.binary)
        self.directory.mkdir(parents=True, exist_ok=True)
        if self._socket_dir is not None:
            self._socket_dir.mkdir(mode=0o700, exist_ok=True)
        self.config.write_text(self.render())
        run_check([binary, "-c", "-f", str(self.config)], "haproxy -c", self.config)
        self.socket.unlink(missing_ok=True)
        self._launch([binary, "-f", str(self.config), "-db"])
        return self

    def _answers(self) -> bool:
        """The stats socket answers."""
        try:
            return bool(self.command("show info"))
        except OSError:
            return False

    # -- runtime API -----------------------------------------------------------

    def command(self, line: str, timeout: float = 2.0) -> str:
        """One runtime API command; its whole answer.  ``OSError`` if the socket
        does not answer (not started yet, or gone)."""
        if "\n" in line or ";" in line:
            raise BalancerError(f"one runtime API command at a time, not {line!r}")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(self.socket))
            sock.sendall(line.encode() + b"\n")
            chunks = []
            while True:  # non-interactive mode: HAProxy closes after its answer
                chunk = sock.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
        return b"".join(chunks).decode(errors="replace")

    def show_stat(self) -> list[dict[str, str]]:
        """``show stat`` as one dict per row (frontend, backend and server rows;
        ``pxname``, ``svname``, ``status``, ``check_status``, ``lastchg``, ...)."""
        text = self.command("show stat")
        lines = [ln for ln in text.splitlines() if ln.strip()]
        if not lines or not lines[0].startswith("# "):
            raise BalancerError(f"unexpected answer to 'show stat': {text[:200]!r}")
        lines[0] = lines[0][2:]
        return [dict(row) for row in csv.DictReader(lines)]

    def backend_states(self) -> dict[str, str]:
        """Server name -> ``UP``, ``DOWN``, ``MAINT``, ``DRAIN`` or ``NOLB``.

        What HAProxy routes by: a transitional ``UP 1/2`` (up, one failed
        check) is ``UP``, ``DOWN 1/2`` (down, one good check) is ``DOWN``.
        """
        out: dict[str, str] = {}
        for row in self.show_stat():
            if row.get("pxname") == BACKEND and row.get("svname") not in ("FRONTEND", "BACKEND"):
                status = row.get("status", "").split(" ", 1)[0]
                out[row["svname"]] = "MAINT" if status.startswith("MAINT") else status
        return out

    def set_server_state(self, name: str, state: Literal["ready", "drain", "maint"]) -> None:
        """``set server keepcount/<name> state <state>``: ``maint`` takes it out
        (no traffic, no checks), ``drain`` keeps its existing connections
        but sends nothing new, ``ready`` puts it back (checks decide UP)."""
        if state not in ("ready", "drain", "maint"):
            raise BalancerError(f"state must be ready, drain or maint, not {state!r}")
        if name not in {b.name for b in self.backends}:
            raise BalancerError(f"no backend server named {name!r}")
        answer = self.command(f"set server {BACKEND}/{name} state {state}").strip()
        if answer:
            raise BalancerError(f"haproxy refused 'set server {name} state {state}': {answer}")

    # -- stop ------------------------------------------------------------------

    def stop(self, timeout: float = 10.0, *, graceful: bool = False) -> None:
        """SIGTERM (or SIGUSR1 if ``graceful``), SIGKILL after ``timeout``; reaped."""
        super().stop(timeout, graceful=graceful)
        if self._socket_dir is not None:
            shutil.rmtree(self._socket_dir, ignore_errors=True)
