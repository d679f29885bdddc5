"""Serving a node in this process: uvicorn, a bound socket, signals, an exit status.

``serve()`` is what ``keepcount node`` runs (and the HTTP benchmark's server,
``keepcount.bench.httpnode``, with one more route).  It starts serving at
once (``/healthz`` 200, ``/readyz`` 503), claims the node id and restores
its counters, then turns ready and says so on stderr.  SIGTERM or SIGINT:
uvicorn stops accepting and lets the requests in flight finish, then the
app flushes and releases the claim; exit 0.  If the node can never serve,
the app reports it (``on_fatal``), the server is told to stop and the exit
status is ``Node.exit_code``.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import socket
import sys
from collections.abc import Sequence
from types import FrameType

import uvicorn
from starlette.routing import BaseRoute

from keepcount.errors import InvalidInput
from keepcount.httpserver import WholeResponseProtocol
from keepcount.node.app import create_app
from keepcount.node.config import NodeConfig
from keepcount.node.endpoints import Node
from keepcount.node.lifecycle import EXIT_CLAIM_LOST

__all__ = ["DEFAULT_LISTEN", "GRACEFUL_SHUTDOWN", "bind", "parse_listen", "serve"]

DEFAULT_LISTEN = "127.0.0.1:8101"

GRACEFUL_SHUTDOWN = 10
"""Seconds uvicorn lets requests in flight finish after SIGTERM.  An increment
waits for one group commit (milliseconds); what is still running after this
is cancelled, not acknowledged, and the final flush writes it anyway."""


class ListenError(InvalidInput):
    """The address cannot be listened on (``bind``): the port is taken, the
    host unknown.  Not the caller's syntax: that is ``InvalidInput``."""


def parse_listen(value: str) -> tuple[str, int]:
    """``HOST:PORT``, ``[V6]:PORT`` or ``PORT`` (on 127.0.0.1) -> (host, port);
    ``InvalidInput`` otherwise."""
    host, sep, port = value.rpartition(":")
    if not sep:
        host = "127.0.0.1"
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise InvalidInput(
            f"{value!r}: expected HOST:PORT or PORT (port 0-65535), e.g. 127.0.0.1:8101"
        )
    return host, int(port)


def bind(host: str, port: int) -> socket.socket:
    """A listening-ready socket on (host, port); ``InvalidInput`` for a host
    that cannot be used, ``ListenError`` if the address cannot be bound."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, kind, proto, _, address = infos[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise InvalidInput(f"cannot use {host!r}: {exc}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise ListenError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    return sock


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def serve(config: NodeConfig, host: str, port: int, *, routes: Sequence[BaseRoute] = ()) -> int:
    """Run the node until SIGTERM/SIGINT (or a fatal start); the exit status.

    ``routes`` go before the API's (the HTTP benchmark's no-op endpoint: the
    same process, server and stack as the product, see ``create_app``).
    Raises ``InvalidInput`` / ``ListenError`` from ``bind`` before anything starts.
    """
    sock = bind(host, port)
    port = sock.getsockname()[1]
    where = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
    name = f"keepcount node {config.node}"
    if config.coordinator is not None and config.advertise is None:
        config = dataclasses.replace(config, advertise=where)

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    logger = logging.getLogger("keepcount")
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING)
    logger.propagate = False

    def ready(n: Node) -> None:
        reg = n.registry
        assert reg is not None
        _say(
            f"{name}: ready on {where} (epoch {reg.epoch}, {reg.restored_series} series "
            f"restored in {reg.restore_seconds:.2f} s)"
        )

    def fatal(message: str) -> None:
        server.should_exit = True

    app = create_app(config, routes=routes, on_ready=ready, on_fatal=fatal)
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            loop="uvloop",
            http=WholeResponseProtocol,  # httptools, each response in one write
            lifespan="on",
            access_log=False,
            log_level="warning",
            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN,
        )
    )

    # uvicorn handles SIGINT/SIGTERM while it serves and, once stopped,
    # raises the signal again against the handler it found: make that one
    # ask for a stop, so a signal before serving stops it cleanly and the
    # one re-raised at the end does not kill the process before it exits 0.
    def stop(sig: int, frame: FrameType | None) -> None:
        server.should_exit = True

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, stop)
    _say(f"{name}: serving on {where}; claiming and restoring from {config.store}")
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    node: Node = app.state.node
    if node.fatal is not None:
        if node.exit_code == EXIT_CLAIM_LOST:
            _say(f"{name}: stopped: {node.fatal}; exit {EXIT_CLAIM_LOST}")
        else:
            _say(f"{name}: did not start (see above); exit 1")
        return node.exit_code
    if node.close_error is not None:
        _say(f"{name}: stopped, but the final flush failed (see above); exit 1")
        return 1
    if node.registry is None:
        _say(f"{name}: stopped before it was ready; nothing was claimed")
    else:
        _say(f"{name}: stopped; counters flushed, claim released")
    return 0
