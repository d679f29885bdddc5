"""``python -m keepcount.bench.httpnode``: ``keepcount node`` plus a no-op endpoint.

The HTTP benchmark's server: the product's node, served exactly as
``keepcount node`` serves it (``keepcount.node.server.serve``: the same
uvicorn settings, app, error handling and process), with one more route,
``POST /bench/noop``, that reads the body and answers a fixed JSON object
of the increment answer's size without touching the registry.  Measuring
both endpoints of one process isolates what durability costs from what the
server stack costs.  With ``--unsafe-ack-before-durable`` the same node
answers increments from memory (the benchmark's second process).
"""

from __future__ import annotations

import click
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from keepcount.bench.http import NOOP_PATH
from keepcount.node import NodeConfig
from keepcount.node.server import parse_listen, serve

__all__ = ["main"]

_ANSWER = (
    b'{"node":"bench","name":"bench_http_total","labels":{"route":"/r0","status":"200"},'
    b'"value":0,"durable":false}'
)
_HEADERS = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(_ANSWER))]


class _Noop:
    """A plain ASGI endpoint, like the node's increment endpoint."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        more = True
        while more:
            message = await receive()
            more = message.get("more_body", False)
        await send({"type": "http.response.start", "status": 200, "headers": _HEADERS})
        await send({"type": "http.response.body", "body": _ANSWER})


@click.command(help="keepcount node with the benchmark's no-op endpoint (POST /bench/noop).")
@click.option("--id", "node_id", required=True)
@click.option("--store", required=True)
@click.option("--listen", required=True)
@click.option("--unsafe-ack-before-durable", is_flag=True, help="NodeConfig's: answer from memory.")
def main(node_id: str, store: str, listen: str, unsafe_ack_before_durable: bool) -> None:
    host, port = parse_listen(listen)
    config = NodeConfig(
        node=node_id, store=store, unsafe_ack_before_durable=unsafe_ack_before_durable
    )
    raise SystemExit(
        serve(config, host, port, routes=[Route(NOOP_PATH, _Noop(), methods=["POST"])])
    )


if __name__ == "__main__":
    main()
