"""NGINX 1.22 (open source) in front of keepcount nodes: config and process.

Example::

    from keepcount.cluster.balancer import Backend
    from keepcount.cluster.nginx import Nginx

    lb = Nginx("/tmp/lb", 8100, [Backend("node-1.a", "127.0.0.1", 8101),
                                 Backend("node-1.b", "127.0.0.1", 8102)])
    lb.start().wait_ready(timeout=10)
    lb.status()            # {'active': 1, 'accepts': 3, 'handled': 3, 'requests': 9, ...}
    lb.backend_states()    # {'node-1.a': 'UP', 'node-1.b': 'DOWN'}  (passive: see below)
    lb.stop()

Contract (``keepcount.cluster.balancer`` has the part both balancers share):

- ``nginx -p <dir> -e stderr -c conf/nginx.conf -g 'daemon off;'``: the
  directory is NGINX's prefix; the pid file, every ``*_temp_path`` and the
  access log are under it (docs/infra.md: without ``-e stderr`` it opens
  /var/log/nginx/error.log before it reads the config).  Its error log
  (level warn) is its stderr, appended to ``<dir>/logs/error.log``.  The
  config is checked with ``nginx -t`` before every start.
- **No active health checks** in open-source NGINX: a node is found failing
  only by live requests (``max_fails=1 fail_timeout=1s``: one failed attempt
  takes the server out for 1-2 s, then one request probes it again).  A
  keyed request or a GET that meets a refused connection, a timeout or a 503
  is passed to the next server.  An *unkeyed POST* that reached a node which
  then answered 503 (not ready) or died gets that 503/502: NGINX cannot know
  whether it was counted, and that 503 does not even take the server out.
  So a node that listens but is not ready receives its round-robin share of
  unkeyed POSTs (they are refused with 503 ``not_ready``, counted nowhere);
  HAProxy's ``/readyz`` check keeps them away.
- ``backend_states()``: NGINX exposes no per-server state (that is NGINX
  Plus's API).  What it can know is read from its own error log: a server is
  ``DOWN`` from the "upstream server temporarily disabled" warning until its
  ``fail_timeout`` has passed (NGINX skips it then), else ``UP`` (meaning: NGINX
  would try it).  Second resolution, per worker.  ``status()`` parses
  ``stub_status``, served on a second 127.0.0.1 port.
- ``stop()`` sends SIGTERM (fast shutdown), ``stop(graceful=True)`` SIGQUIT
  (finish requests in flight); SIGKILL to the master and its workers after
  the deadline (``ProcessBalancer.stop``).
"""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from keepcount import httpclient
from keepcount.cluster.balancer import (
    Backend,
    BalancerError,
    Listen,
    ProcessBalancer,
    find_binary,
    run_check,
)
from keepcount.nodeproc import free_port

__all__ = ["UPSTREAM", "Nginx", "NginxSettings", "render_config"]

UPSTREAM = "keepcount"
"""The upstream block's name."""

KEYED_LOCATION = "/__keepcount_keyed/"
"""The internal location keyed requests are rewritten to (see ``render_config``)."""

_TEMP_PATHS = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
_DISABLED = re.compile(
    r"^(\d{4}/\d\d/\d\d \d\d:\d\d:\d\d) \[warn\].*upstream server temporarily disabled"
    r".*upstream: \"[a-z]+://([^/\"]+)"
)
_STUB = re.compile(
    r"Active connections:\s*(\d+)\s+server accepts handled requests\s+(\d+)\s+(\d+)\s+(\d+)\s+"
    r"Reading:\s*(\d+)\s+Writing:\s*(\d+)\s+Waiting:\s*(\d+)"
)


@dataclass(frozen=True)
class NginxSettings:
    """Timeouts (seconds) and passive-check parameters, with the reasoning.

    ``max_fails=1``/``fail_timeout=1``: the only failure detection there is
    (passive); one refused connection takes a server out for 1-2 s, so the
    unused slot of a node id costs one instantly refused connection per
    second per worker, and a killed node one failed attempt (then retried).
    ``connect_timeout``: loopback refuses at once; short for hosts that drop
    SYNs.  ``read_timeout``: an answer comes once the increment is durable (a
    group commit, ms); 2 s abandons a SIGSTOPped node quickly.
    ``tries``: attempts per request (None: one per backend, each refused
    slot failing fast); ``next_timeout``: the bound on all of them.
    ``keepalive_timeout``: under uvicorn's 5 s keep-alive, so NGINX never
    reuses a connection the node is closing (an unkeyed POST sent on one is
    a 502).  ``workers``: one is plenty on loopback, the nodes need the cores.
    """

    max_fails: int = 1
    fail_timeout: int = 1
    connect_timeout: float = 0.3
    read_timeout: float = 2.0
    send_timeout: float = 2.0
    tries: int | None = None
    next_timeout: float = 5.0
    keepalive: int = 32
    keepalive_timeout: float = 4.0
    workers: int = 1
    status_port: int | None = None
    binary: str | None = None

    def __post_init__(self) -> None:
        for name in ("connect_timeout", "read_timeout", "send_timeout", "next_timeout",
                     "keepalive_timeout"):  # fmt: skip
            value = getattr(self, name)
            if not isinstance(value, int | float) or not value >= 0.001:
                raise BalancerError(f"{name} must be at least 0.001 s, not {value!r}")
        for name in ("max_fails", "fail_timeout", "keepalive", "workers"):
            if type(getattr(self, name)) is not int or getattr(self, name) < 1:
                raise BalancerError(f"{name} must be a positive integer")
        if self.tries is not None and (type(self.tries) is not int or self.tries < 1):
            raise BalancerError("tries must be a positive integer or None")


def _ms(seconds: float) -> str:
    return f"{max(1, round(seconds * 1000))}ms"


def render_config(
    listen: tuple[str, int],
    status_port: int,
    backends: list[Backend],
    settings: NginxSettings,
    *,
    run_as_root: bool = False,
) -> str:
    """The whole ``nginx.conf`` (paths relative to the prefix): a pure function
    of its inputs (unit-tested).  ``run_as_root``: NGINX started by root runs
    its workers as ``nobody`` unless told otherwise, and nobody cannot reach
    a private temp directory."""
    s = settings
    tries = s.tries if s.tries is not None else len(backends)
    servers = "\n".join(
        f"        server {b.address} max_fails={s.max_fails} fail_timeout={s.fail_timeout}s;"
        f"  # {b.name}"
        for b in backends
    )
    temp = "\n".join(f"    {name}_temp_path temp/{name};" for name in _TEMP_PATHS)
    user = "user root;\n" if run_as_root else ""
    return f"""\
# Generated by keepcount.cluster.nginx: edits are overwritten at the next start.
{user}worker_processes {s.workers};
pid nginx.pid;
# The error log is stderr (started with -e stderr), appended to logs/error.log;
# warn level keeps "upstream server temporarily disabled" (backend_states).
error_log stderr warn;

events {{
    worker_connections 1024;
}}

http {{
{temp}
    log_format keepcount '$msec $status "$request" key="$http_idempotency_key" '
                         'upstream=$upstream_addr ustatus=$upstream_status rt=$request_time';
    access_log logs/access.log keepcount buffer=32k flush=1s;

    # Keyed requests are marked for the internal location below.  A map, not
    # "if ($http_idempotency_key)": NGINX's if treats the valid key "0" as false.
    map $http_idempotency_key $keepcount_keyed {{
        ""      0;
        default 1;
    }}

    upstream {UPSTREAM} {{
        # Peer state shared by all workers.
        zone {UPSTREAM} 64k;
        # The same key goes to the same node while it is up; an empty key
        # (no header) falls back to round robin (ngx_http_upstream_hash_module:
        # key.len == 0 -> get_rr_peer).
        hash $http_idempotency_key consistent;
        # Passive checks only (open-source NGINX): one failure takes a server
        # out for fail_timeout; the unused slot of a node id then costs one
        # refused connection per fail_timeout.
{servers}
        keepalive {s.keepalive};
        keepalive_timeout {_ms(s.keepalive_timeout)};
    }}

    proxy_http_version 1.1;
    proxy_set_header Connection "";
    proxy_connect_timeout {_ms(s.connect_timeout)};
    proxy_send_timeout {_ms(s.send_timeout)};
    proxy_read_timeout {_ms(s.read_timeout)};
    proxy_next_upstream_tries {tries};
    proxy_next_upstream_timeout {_ms(s.next_timeout)};
    # The body is read whole before a server is chosen, so it can be replayed.
    proxy_request_buffering on;

    server {{
        listen {listen[0]}:{listen[1]};

        location / {{
            # proxy_next_upstream cannot be set per request, and not inside
            # "if": keyed requests go to a location of their own (a rewrite
            # inside if-in-location is one of the safe uses of if).
            if ($keepcount_keyed) {{
                rewrite ^ {KEYED_LOCATION} last;
            }}
            proxy_pass http://{UPSTREAM};
            # Without a key a POST is never replayed once sent (NGINX's
            # default without non_idempotent): the node may have counted it.
            proxy_next_upstream error timeout http_502 http_503;
        }}

        location {KEYED_LOCATION} {{
            internal;
            # The client's URI as it sent it, arguments included.
            proxy_pass http://{UPSTREAM}$request_uri;
            # docs/infra.md: on a backend kill, 3 POST 502s without non_idempotent,
            # 0 with it.  Safe here only: the key makes a replay count once.
            proxy_next_upstream error timeout http_502 http_503 non_idempotent;
        }}
    }}

    server {{
        listen 127.0.0.1:{status_port};
        access_log off;
        location = /status {{
            stub_status;
        }}
    }}
}}
"""


class Nginx(ProcessBalancer):
    """An NGINX process in front of ``backends`` (see the module docstring).

    Invariants: the directory is NGINX's prefix; ``url`` and ``status_url``
    are fixed at construction (free ports if not given).
    """

    kind = "nginx"
    graceful_signal = signal.SIGQUIT

    def __init__(
        self,
        directory: str | os.PathLike[str],
        listen: Listen,
        backends: Sequence[Backend],
        **settings: object,
    ) -> None:
        super().__init__(Path(directory).absolute(), listen, backends)
        self.settings = NginxSettings(**settings)  # type: ignore[arg-type]
        self.status_port = self.settings.status_port or free_port()
        self.config = self.directory / "conf" / "nginx.conf"
        self.log = self.directory / "logs" / "error.log"
        self.access_log = self.directory / "logs" / "access.log"
        self._by_address = {b.address: b.name for b in self.backends}
        self._log_offset = 0
        self._disabled: dict[str, float] = {}  # backend name -> last "temporarily disabled"

    @property
    def status_url(self) -> str:
        return f"http://127.0.0.1:{self.status_port}/status"

    def render(self) -> str:
        return render_config(
            self.listen,
            self.status_port,
            self.backends,
            self.settings,
            run_as_root=os.geteuid() == 0,
        )

    def _argv(self, binary: str, *extra: str) -> list[str]:
        return [binary, "-p", f"{self.directory}/", "-e", "stderr", "-c", "conf/nginx.conf",
                "-g", "daemon off;", *extra]  # fmt: skip

    def start(self) -> Nginx:
        self._check_stopped()
        binary = find_binary("nginx", "nginx", self.settings.binary)
        for sub in ("conf", "logs", "temp"):
            (self.directory / sub).mkdir(parents=True, exist_ok=True)
        self.config.write_text(self.render())
        run_check(self._argv(binary, "-t", "-q"), "nginx -t", self.config)
        self._log_offset = self.log.stat().st_size if self.log.exists() else 0
        self._disabled.clear()
        self._launch(self._argv(binary))
        return self

    def _answers(self) -> bool:
        """``stub_status`` answers."""
        try:
            self.status()
        except (OSError, BalancerError):
            return False
        return True

    def status(self) -> dict[str, int]:
        """``stub_status`` as numbers: active, accepts, handled, requests,
        reading, writing, waiting."""
        status, body = httpclient.get(f"http://127.0.0.1:{self.status_port}/status", timeout=2)
        text = body.decode(errors="replace")
        m = _STUB.search(text)
        if status != 200 or m is None:
            raise BalancerError(f"unexpected stub_status answer {status}: {text[:200]!r}")
        keys = ("active", "accepts", "handled", "requests", "reading", "writing", "waiting")
        return dict(zip(keys, (int(g) for g in m.groups()), strict=True))

    def backend_states(self) -> dict[str, str]:
        """Backend name -> ``DOWN`` while NGINX's passive check has it disabled
        (by its error log), else ``UP``; see the module docstring."""
        self._read_log()
        now = time.time()
        # Log times have second resolution: a server logged at second T is
        # skipped until T + fail_timeout at the latest + 1 s of rounding.
        window = self.settings.fail_timeout + 1
        return {
            b.name: "DOWN" if now - self._disabled.get(b.name, -1e18) < window else "UP"
            for b in self.backends
        }

    def _read_log(self) -> None:
        try:
            with open(self.log, "rb") as f:
                f.seek(self._log_offset)
                data = f.read()
        except FileNotFoundError:
            return
        end = data.rfind(b"\n") + 1  # a line being written is read next time
        self._log_offset += end
        for line in data[:end].decode(errors="replace").splitlines():
            m = _DISABLED.match(line)
            if m is None:
                continue
            name = self._by_address.get(m.group(2))
            if name is not None:
                when = time.mktime(time.strptime(m.group(1), "%Y/%m/%d %H:%M:%S"))
                self._disabled[name] = max(when, self._disabled.get(name, when))
