"""The HTTP node: one registry behind a Starlette app (``docs/design.md``, "HTTP (one node)").

Example::

    import uvicorn
    from keepcount.node import NodeConfig, create_app

    app = create_app(NodeConfig(node="node-1", store="sqlite:////var/lib/app/c.db"))
    uvicorn.run(app, host="127.0.0.1", port=8101, lifespan="on")

The app answers HTTP at once: ``/healthz`` is 200, ``/readyz`` 503
(``not_ready``) and every data endpoint 503 until the node has claimed its
id and restored its values; then it serves while its claim is trusted.
``POST /v1/counters/{name}/increment`` answers 200 only after the increment
is durable (``Registry.increment``); concurrent requests share one group
commit.  Any error is ``{"error": {"code", "message"}}`` with a stable code.
On shutdown the registry is flushed and the claim released.

One module per concern:

- ``config``: ``NodeConfig``, the node's settings declared once (validation,
  ``keepcount node`` options, ``NodeConfig.to_argv()``).
- ``lifecycle``: ``NodeState`` and ``Lifecycle`` (claim with retries,
  restore, readiness, fencing, shutdown): the one value every reader reads.
- ``bodies``: the msgspec types that decode requests and encode answers.
- ``errors``: ``HTTPError``, the error answers and their codes.
- ``endpoints``: ``Node``, the endpoints on top of the lifecycle.
- ``live``: the live page's document (``/ui/state.json``).
- ``routes``: the route table; ``openapi``: the document derived from it.
- ``app``: ``create_app``.
"""

from __future__ import annotations

from keepcount.node.app import create_app
from keepcount.node.bodies import DEFAULT_HELP, MAX_HELP_LENGTH, decode_increment
from keepcount.node.config import (
    DEFAULT_CLAIM_TIMEOUT,
    DEFAULT_CLAIM_TTL,
    DEFAULT_MAX_BODY,
    NodeConfig,
)
from keepcount.node.endpoints import Node
from keepcount.node.errors import RETRY_AFTER, HTTPError, error_response
from keepcount.node.lifecycle import EXIT_CLAIM_LOST, Lifecycle, NodeState

__all__ = [
    "DEFAULT_CLAIM_TIMEOUT",
    "DEFAULT_CLAIM_TTL",
    "DEFAULT_HELP",
    "DEFAULT_MAX_BODY",
    "EXIT_CLAIM_LOST",
    "MAX_HELP_LENGTH",
    "RETRY_AFTER",
    "HTTPError",
    "Lifecycle",
    "Node",
    "NodeConfig",
    "NodeState",
    "create_app",
    "decode_increment",
    "error_response",
]
