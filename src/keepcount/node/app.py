"""``create_app``: a node's Starlette app, assembled in one place.

The routes come from the route table (``keepcount.node.routes``), each on
the ``Node`` method it names, then the live page's files; the lifespan is
the node's ``Lifecycle.run``; every exception is answered by
``keepcount.node.errors.exception_handlers``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from starlette.applications import Starlette
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from keepcount.node.config import NodeConfig
from keepcount.node.endpoints import Node
from keepcount.node.errors import exception_handlers
from keepcount.node.routes import OPERATIONS
from keepcount.ui import asset_routes

__all__ = ["create_app"]


class _ASGIEndpoint:
    """Marks a method as a plain ASGI endpoint: ``Route`` would wrap a method
    as a request/response handler."""

    __slots__ = ("call",)

    def __init__(self, call: ASGIApp) -> None:
        self.call = call

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.call(scope, receive, send)


def create_app(
    config: NodeConfig,
    *,
    routes: Sequence[BaseRoute] = (),
    on_ready: Callable[[Node], None] | None = None,
    on_fatal: Callable[[str], None] | None = None,
) -> Starlette:
    """The node's ASGI app; its ``Node`` is ``app.state.node``.

    ``routes`` are mounted before the API's own (the benchmark's no-op
    endpoint: the same app, stack and error handling, outside the product
    API).  ``on_ready(node)`` runs once the node is restored and holds its
    claim; ``on_fatal(message)`` when it never will (see
    ``keepcount.node.lifecycle``).
    """
    node = Node(config, on_ready=on_ready, on_fatal=on_fatal)
    api: list[BaseRoute] = []
    for op in OPERATIONS:
        endpoint = getattr(node, op.endpoint)
        if op.request is not None:  # a body: the hot path, a plain ASGI endpoint
            endpoint = _ASGIEndpoint(endpoint)
        api.append(Route(op.route, endpoint, methods=[op.method]))
    app = Starlette(
        routes=[*routes, *api, *asset_routes()],
        lifespan=node.run,
        exception_handlers=exception_handlers(node.not_ready),
    )
    app.state.node = node
    return app
