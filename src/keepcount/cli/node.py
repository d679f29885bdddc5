"""``keepcount node``: serve one node's counters over HTTP (uvicorn + ``keepcount.node``).

Starts serving at once (``/healthz`` 200, ``/readyz`` 503), claims the node
id and restores its counters, then turns ready and says so on stderr.
SIGTERM or SIGINT: uvicorn stops accepting and lets the requests in flight
finish, then the app flushes and releases the claim; exit 0.  If the node
can never serve (a corrupt or foreign store, a claim still held by another
live process after ``--claim-timeout``), the app reports it (``on_fatal``),
the server is told to stop (``server.should_exit``) and the command exits 1
with the message.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import socket
import sys
from collections.abc import Sequence
from types import FrameType

import click
import uvicorn
from starlette.routing import BaseRoute

from keepcount.commit import DEFAULT_FLUSH_INTERVAL, DEFAULT_IDEMPOTENCY_TTL
from keepcount.errors import InvalidInput
from keepcount.httpserver import WholeResponseProtocol
from keepcount.metrics import DEFAULT_MAX_CHILDREN
from keepcount.node import (
    DEFAULT_CLAIM_TIMEOUT,
    DEFAULT_CLAIM_TTL,
    DEFAULT_MAX_BODY,
    EXIT_CLAIM_LOST,
    Node,
    NodeConfig,
    create_app,
)
from keepcount.stores import sqlite_path

__all__ = ["node", "parse_listen", "serve"]

DEFAULT_LISTEN = "127.0.0.1:8101"

GRACEFUL_SHUTDOWN = 10
"""Seconds uvicorn lets requests in flight finish after SIGTERM.  An increment
waits for one group commit (milliseconds); what is still running after this
is cancelled, not acknowledged, and the final flush writes it anyway."""


def parse_listen(value: str) -> tuple[str, int]:
    """``HOST:PORT``, ``[V6]:PORT`` or ``PORT`` (on 127.0.0.1) -> (host, port)."""
    host, sep, port = value.rpartition(":")
    if not sep:
        host = "127.0.0.1"
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise click.BadParameter(
            f"{value!r}: expected HOST:PORT or PORT (port 0-65535), e.g. 127.0.0.1:8101",
            param_hint="--listen",
        )
    return host, int(port)


def _bind(host: str, port: int) -> socket.socket:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, kind, proto, _, address = infos[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise click.BadParameter(f"cannot use {host!r}: {exc}", param_hint="--listen") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise click.ClickException(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    return sock


@click.command()
@click.option("--id", "node_id", required=True,
              help="Node id to claim: 1-63 letters, digits, '_', '.', '-'.")  # fmt: skip
@click.option("--store", required=True,
              help="Store URL, e.g. sqlite:////var/lib/app/counters.db (four slashes: absolute).")  # fmt: skip
@click.option("--listen", default=DEFAULT_LISTEN, show_default=True,
              help="HOST:PORT to serve on; PORT alone means 127.0.0.1:PORT.")  # fmt: skip
@click.option("--token", envvar="KEEPCOUNT_TOKEN", show_envvar=True, default=None,
              help="Require 'Authorization: Bearer TOKEN' on writes (prefer the env "
                   "variable: arguments are visible to other users).")  # fmt: skip
@click.option("--idempotency-ttl", type=click.FloatRange(0, min_open=True),
              default=DEFAULT_IDEMPOTENCY_TTL, show_default=True,
              help="Seconds an Idempotency-Key is remembered.")  # fmt: skip
@click.option("--max-body", type=click.IntRange(1), default=DEFAULT_MAX_BODY, show_default=True,
              help="Largest request body accepted, in bytes.")  # fmt: skip
@click.option("--flush-interval", type=click.FloatRange(0, min_open=True),
              default=DEFAULT_FLUSH_INTERVAL, show_default=True,
              help="Seconds between background flushes (HTTP increments are durable "
                   "before they are answered regardless).")  # fmt: skip
@click.option("--max-children", type=click.IntRange(0), default=DEFAULT_MAX_CHILDREN,
              show_default=True, help="Label sets per counter before 422; 0: no limit.")  # fmt: skip
@click.option("--claim-timeout", type=click.FloatRange(0), default=DEFAULT_CLAIM_TIMEOUT,
              show_default=True,
              help="Seconds to keep retrying a node id another live process holds.")  # fmt: skip
@click.option("--coordinator", default=None, metavar="URL",
              help="Claim the id through etcd://host:port,.../ns or zookeeper://host:port,.../ns "
                   "(lease with a fencing epoch) instead of the store's own lock.")  # fmt: skip
@click.option("--claim-ttl", type=click.FloatRange(0, min_open=True), default=DEFAULT_CLAIM_TTL,
              show_default=True,
              help="With --coordinator: seconds the claim outlives its last renewal.")  # fmt: skip
@click.option("--advertise", default=None, metavar="URL",
              help="URL published with the claim (default: http://HOST:PORT of --listen).")  # fmt: skip
@click.option("--unsafe-ack-before-durable", is_flag=True, hidden=True,
              help="A deliberately broken node for testing `keepcount verify`: acknowledge "
                   "increments before they are durable.")  # fmt: skip
def node(
    node_id: str,
    store: str,
    listen: str,
    token: str | None,
    idempotency_ttl: float,
    max_body: int,
    flush_interval: float,
    max_children: int,
    claim_timeout: float,
    coordinator: str | None,
    claim_ttl: float,
    advertise: str | None,
    unsafe_ack_before_durable: bool,
) -> None:
    """Serve one node: claim --id (in --coordinator, or in --store), restore its
    counters from --store, then serve HTTP.

    Exit status: 0 after SIGTERM/SIGINT (flushed, claim released); 1 if it
    could not start (or its final flush failed); 3 if it lost its claim
    while serving (a supervisor should start a new incarnation).
    """
    host, port = parse_listen(listen)
    try:
        if store.startswith("sqlite:"):
            sqlite_path(store)
        config = NodeConfig(
            node=node_id,
            store=store,
            token=token or None,
            idempotency_ttl=idempotency_ttl,
            max_body=max_body,
            flush_interval=flush_interval,
            max_children=max_children or None,
            claim_timeout=claim_timeout,
            coordinator=coordinator,
            claim_ttl=claim_ttl,
            advertise=advertise,
            unsafe_ack_before_durable=unsafe_ack_before_durable,
        )
    except InvalidInput as exc:
        raise click.UsageError(str(exc)) from None
    raise SystemExit(serve(config, host, port))


def serve(config: NodeConfig, host: str, port: int, *, routes: Sequence[BaseRoute] = ()) -> int:
    """Run the node until SIGTERM/SIGINT (or a fatal start); the exit status.

    ``routes`` go before the API's (the HTTP benchmark's no-op endpoint: the
    same process, server and stack as the product, see ``create_app``).
    """
    sock = _bind(host, port)
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
        click.echo(
            f"{name}: ready on {where} (epoch {reg.epoch}, {reg.restored_series} series "
            f"restored in {reg.restore_seconds:.2f} s)",
            err=True,
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
    click.echo(f"{name}: serving on {where}; claiming and restoring from {config.store}", err=True)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    state: Node = app.state.node
    if state.fatal is not None:
        if state.exit_code == EXIT_CLAIM_LOST:
            click.echo(f"{name}: stopped: {state.fatal}; exit {EXIT_CLAIM_LOST}", err=True)
        else:
            click.echo(f"{name}: did not start (see above); exit 1", err=True)
        return state.exit_code
    if state.close_error is not None:
        click.echo(f"{name}: stopped, but the final flush failed (see above); exit 1", err=True)
        return 1
    if state.registry is None:
        click.echo(f"{name}: stopped before it was ready; nothing was claimed", err=True)
    else:
        click.echo(f"{name}: stopped; counters flushed, claim released", err=True)
    return 0
